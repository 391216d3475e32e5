"""LLM sources other than GGUF: a local Hugging Face folder and a from-scratch config with a
word-level or BPE tokenizer fitted on the training text; the HF datasets reader."""

import pytest
import torch

from mmlm.checkpoint import load
from mmlm.config import parse_config
from mmlm.llm import HFOptions, ScratchOptions, TokenizerSpec, load_hf, load_scratch, train_tokenizer
from mmlm.model import build
from tests.helpers import TEXTS, TINY_LLM, tiny_raw


def test_bpe_and_word_tokenizers_roundtrip_training_text():
    for kind in ("word", "bpe"):
        tok = train_tokenizer(TEXTS, TokenizerSpec(type=kind, vocab_size=300))
        ids = tok("what color is the circle?", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids).replace(" ?", "?") == "what color is the circle?"
        # chat markers are single special tokens
        assert len(tok("<|user|>", add_special_tokens=False)["input_ids"]) == 1


def test_local_hf_folder_loads_the_same_weights(tmp_path):
    loaded = load_scratch(
        ScratchOptions(config=TINY_LLM["config"], tokenizer={"type": "bpe", "vocab_size": 300}), texts=TEXTS
    )
    loaded.model.save_pretrained(tmp_path / "llm")
    loaded.tokenizer.save_pretrained(tmp_path / "llm")
    again = load_hf(HFOptions(path=str(tmp_path / "llm"), attn_implementation="eager"))
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        # sdpa (saved) vs eager (loaded): same weights, attention computed two ways
        assert torch.allclose(loaded.model(ids).logits, again.model(ids).logits, atol=1e-5)
    assert again.pretrained and again.model.config._attn_implementation == "eager"

    # as the LLM of a VLM: the checkpoint references the folder and stores no LLM tensors
    raw = tiny_raw()
    raw["model"]["llm"] = {"type": "hf", "path": str(tmp_path / "llm")}
    model = build(parse_config(raw))
    model.save(tmp_path / "ck")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ck" / "model.safetensors")).keys()
    assert keys and not any(k.startswith("llm.") for k in keys)
    full = tmp_path / "full"
    model.save(full, full=True)
    assert any(k.startswith("llm.") for k in load_file(str(full / "model.safetensors")).keys())
    assert load(tmp_path / "ck").llm.config.vocab_size == model.llm.config.vocab_size


def test_scratch_llm_needs_text_or_a_saved_tokenizer():
    with pytest.raises(ValueError, match="fits its tokenizer on the training text"):
        load_scratch(ScratchOptions(config=TINY_LLM["config"]))


def test_hf_datasets_reader(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from mmlm.data.dataset import StageDataset
    from mmlm.data.sources import HFOptions, read_hf

    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))],
            "conversations": [
                [{"from": "human", "value": "<image>\nwhat color is the circle?"}, {"from": "gpt", "value": "red"}],
                [{"from": "human", "value": "what color is the circle?"}, {"from": "gpt", "value": "blue"}],
            ],
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    recs = read_hf(HFOptions(path=str(tmp_path / "ds")))
    assert len(recs) == 2
    assert recs[1].messages[0]["content"].startswith("<image>")  # LLaVA convention: placeholder added
    model = build(parse_config(tiny_raw()), texts=TEXTS)
    data = StageDataset(recs, model.processor, "error")
    enc = data.load(0)
    assert enc.input_ids.count(-200) == model.processor.media["image"].num_tokens
    assert enc.media["image"][0].shape == (3, 32, 32)
