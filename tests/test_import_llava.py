"""``mmlm import``: tiny transformers Llava checkpoints (CLIP tower with strategy ``default``, SigLIP
with ``full``), saved by transformers in the on-disk layout, rewritten in the in-memory layout, and
written in the original LLaVA layout, become mmlm checkpoints whose logits and greedy tokens equal
transformers' own on the same inputs."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import mmlm  # noqa: E402
from mmlm.zoo.llava_import import import_llava  # noqa: E402
from tests.helpers import TINY_VIT  # noqa: E402

WORDS = "user assistant what color shape is the red blue green circle square ? . : a an of".split()
LLAVA_TEMPLATE = (  # llava-1.5's: content lists, images first
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = LLAVA_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def tiny_llava(folder, tower: str, layer=-2, strategy="default", seed=0):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tok = tokenizer(folder)
    vision = {"model_type": f"{tower}_vision_model", **TINY_VIT}
    text = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    n_tokens = (32 // 8) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=n_tokens,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the default init, so that logits differ clearly
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    CLIPImageProcessor(
        size={"height": 32, "width": 32}, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return model


def image(color):
    im = Image.new("RGB", (32, 32), (255, 255, 255))
    im.paste(color, (6, 10, 26, 28))
    return im


def compare(hf, ckpt, colors=((220, 20, 20), (20, 20, 220))):
    """Max |logits difference| on one question about each image, and whether greedy tokens agree."""
    model = mmlm.load(ckpt)
    proc = model.processor
    diffs, same_tokens, logits = [], [], []
    for color in colors:
        im = image(color)
        batch = proc([[{"role": "user", "content": "<image>\nwhat color is the shape ?"}]], [{"image": [im]}])
        ids = batch["input_ids"].clone()
        ids[ids == proc.media["image"].token_id] = hf.config.image_token_index
        with torch.no_grad():
            ours = model(**model.inputs(batch)).logits
            theirs = hf(
                input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
            ).logits
        diffs.append((ours - theirs).abs().max().item())
        logits.append(ours[0, -1])
        mine = model.generate(batch, max_new_tokens=6)[0]
        gen = hf.generate(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            max_new_tokens=6,
            do_sample=False,
        )[0, ids.shape[1] :].tolist()
        eos = set(proc.stop_token_ids())
        gen = gen[: next((i for i, t in enumerate(gen) if t in eos), len(gen))]
        same_tokens.append(mine == gen and len(mine) > 0)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)  # the image matters: the check is not vacuous
    return max(diffs), all(same_tokens), model


@pytest.mark.parametrize(("tower", "strategy", "layer"), [("clip", "default", -2), ("siglip", "full", -1)])
def test_import_gives_transformers_logits_and_tokens(tmp_path, tower, strategy, layer):
    hf = tiny_llava(tmp_path / "src", tower, layer, strategy)
    ckpt = import_llava(tmp_path / "src", tmp_path / "ckpt")
    diff, same, model = compare(hf, ckpt)
    assert diff <= 1e-5 and same, (diff, same)
    enc = model.config.model.encoders["image"].model_dump()
    assert enc["select_layers"] == [layer] and enc["drop_prefix_tokens"] == (strategy == "default")
    assert model.encoders["image"].num_tokens == hf.config.image_seq_length
    # the delta: the projector only; the tower and the LLM are referenced from parts/
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("connectors.") for k in keys), sorted(keys)[:5]


def test_the_in_memory_key_layout_imports_the_same(tmp_path):
    """transformers 4.52+/5.x's in-memory names (model.language_model.*, lm_head) written to disk."""
    from safetensors.torch import load_file, save_file

    hf = tiny_llava(tmp_path / "src", "clip")
    disk = load_file(str(tmp_path / "src" / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in disk)  # transformers wrote the legacy layout
    renamed = {}
    for k, v in disk.items():
        if k.startswith("language_model.model."):
            renamed["model.language_model." + k[len("language_model.model.") :]] = v
        elif k == "language_model.lm_head.weight":
            renamed["lm_head.weight"] = v
        else:
            renamed["model." + k] = v
    save_file(renamed, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    from mmlm.zoo.llava_import import layout_of

    assert layout_of(renamed) == "memory" and layout_of(disk) == "disk"
    diff, same, _ = compare(hf, import_llava(tmp_path / "src", tmp_path / "ckpt"))
    assert diff <= 1e-5 and same


def test_the_original_llava_layout_imports_with_its_tower_from_mm_vision_tower(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_llava(tmp_path / "hf", "clip")
    disk = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tower = tmp_path / "tower"
    hf.model.vision_tower.save_pretrained(tower)
    (tower / "preprocessor_config.json").write_text((tmp_path / "hf" / "preprocessor_config.json").read_text())
    src = tmp_path / "orig"
    src.mkdir()
    orig = {}
    for k, v in disk.items():
        if k.startswith("multi_modal_projector.linear_1."):
            orig["model.mm_projector.0." + k.split(".")[-1]] = v
        elif k.startswith("multi_modal_projector.linear_2."):
            orig["model.mm_projector.2." + k.split(".")[-1]] = v
        elif k.startswith("language_model.model."):
            orig[k[len("language_model.") :]] = v
        elif k == "language_model.lm_head.weight":
            orig["lm_head.weight"] = v
    save_file(orig, str(src / "model.safetensors"), metadata={"format": "pt"})
    text = hf.config.text_config.to_dict()
    conf = {
        **{k: v for k, v in text.items() if k not in ("architectures",)},
        "model_type": "llava_llama",
        "mm_vision_tower": str(tower),
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "image_token_index": hf.config.image_token_index,
    }
    (src / "config.json").write_text(json.dumps(conf))
    for f in (tmp_path / "hf").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            (src / f.name).write_bytes(f.read_bytes())
    diff, same, _ = compare(hf, import_llava(src, tmp_path / "ckpt"))
    assert diff <= 1e-5 and same


def test_the_imported_checkpoint_moves_and_keeps_the_template_for_string_messages(tmp_path):
    tiny_llava(tmp_path / "src", "clip")
    ckpt = import_llava(tmp_path / "src", tmp_path / "ckpt")
    moved = tmp_path / "elsewhere"
    ckpt.rename(moved)
    model = mmlm.load(moved)  # parts/ named relative to the checkpoint
    text = model.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nwhat color ?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "USER: <image>\nwhat color ? ASSISTANT:"  # llava-1.5's own rendering of [image, text]


def test_a_source_that_is_not_llava_is_refused_with_the_reason(tmp_path):
    from mmlm.zoo.llava_import import ImportError_

    (tmp_path / "x").mkdir()
    with pytest.raises(ImportError_, match="no config.json"):
        import_llava(tmp_path / "x", tmp_path / "out")
    (tmp_path / "x" / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ImportError_, match="no .safetensors"):
        import_llava(tmp_path / "x", tmp_path / "out")
    from safetensors.torch import save_file

    save_file({"model.layers.0.w": torch.zeros(2)}, str(tmp_path / "x" / "model.safetensors"))
    with pytest.raises(ImportError_, match="no Llava layout"):
        import_llava(tmp_path / "x", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    tiny_llava(tmp_path / "src", "clip")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ImportError_, match="not empty"):
        import_llava(tmp_path / "src", tmp_path / "busy")
