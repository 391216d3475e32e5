"""The GGUF conversion cache (mmlm/gguf_cache.py): the first load of SmolLM2's GGUF file (the
session's ``smollm2`` fixture) converts it; a later load reads the converted folder and gives the
same weights, tokenizer and chat template; the entry is keyed by the file's content."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mmlm.gguf_cache import cache_root, file_digest
from mmlm.llm import GGUFOptions, load_gguf


def test_a_second_load_reads_the_converted_folder_and_gives_the_same_model(smollm2, smollm2_path):
    root = cache_root()
    assert root is not None and str(root).startswith(os.environ["MMLM_CACHE"])
    entry = root / file_digest(smollm2_path, root)
    assert (entry / "source.json").is_file() and (entry / "model.safetensors").is_file()  # written by the first load
    again = load_gguf(GGUFOptions(path=str(smollm2_path), attn_implementation="sdpa"))
    a, b = smollm2.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    chat = [{"role": "user", "content": "What colour is the sky?"}]
    t1 = smollm2.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    t2 = again.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert t1 == t2 and "<|im_start|>assistant" in t1
    assert smollm2.tokenizer(t1)["input_ids"] == again.tokenizer(t1)["input_ids"]
    assert again.tokenizer.pad_token is not None
    ids = again.tokenizer("The sky is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(smollm2.model(ids).logits, again.model(ids).logits)


def test_the_key_is_the_content_remembered_per_file_state(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    first = file_digest(f, root)
    assert (root / "index.json").is_file()
    other = tmp_path / "copy.gguf"
    other.write_bytes(f.read_bytes())
    assert file_digest(other, root) == first  # two paths, one content, one entry
    f.write_bytes(b"GGUF" + b"\1" * 100)
    os.utime(f, ns=(1, 1))  # even with a reset modification time the size/inode/mtime key changes
    assert file_digest(f, root) != first
    monkeypatch.setenv("MMLM_CACHE", "off")
    assert cache_root() is None
    monkeypatch.setenv("MMLM_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == Path(tmp_path / "elsewhere" / "gguf")
