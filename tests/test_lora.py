"""LoRA per stage (mmlm/train/lora.py): only adapters and declared parts train, the checkpoint of a
pretrained LLM holds the adapters and not the LLM, a reload and a merge give the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_raw
from PIL import Image
from safetensors.torch import load_file

import mmlm
from mmlm.config import parse_config
from mmlm.errors import ConfigError
from mmlm.model import build
from mmlm.train.lora import LoraOptions, attach, merge_lora
from mmlm.train.runner import train

DATA = Path(__file__).parent / "data"
TEXTS = ["what color is the circle", "a red circle", "a blue square", "yes", "no", "top left"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 'pretrained' LLM: a tiny Llama saved as a transformers folder (model + tokenizer)."""
    from mmlm.llm import ScratchOptions, load_scratch
    from tests.helpers import TINY_LLM

    folder = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    src = load_scratch(ScratchOptions(**{k: v for k, v in TINY_LLM.items() if k != "type"}), texts=TEXTS)
    src.model.save_pretrained(folder)
    src.tokenizer.save_pretrained(folder)
    return folder


def lora_raw(data, llm_folder, steps=4, **lora):
    raw = tiny_raw(str(data), n=12, steps=steps)
    raw["model"]["llm"] = {"type": "hf", "path": str(llm_folder)}
    raw["train"]["stages"] = raw["train"]["stages"][1:]  # one instruction stage
    st = raw["train"]["stages"][0]
    st["trainable"] = ["connectors.*"]
    st["lr"] = 1e-2
    st["lora"] = {"llm": {"r": 4, "alpha": 8, "dropout": 0.0, **lora}}
    return raw


def _logits(model):
    msgs = [[{"role": "user", "content": "<image>\nwhat color is the circle?"}]]
    batch = model.processor(msgs, [{"image": [Image.open(DATA / "scene.png")]}], add_generation_prompt=True)
    with torch.no_grad():
        return model(**model.inputs(batch)).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory, source):
    out = tmp_path_factory.mktemp("run")
    cfg = parse_config(lora_raw(out / "data", source, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    before = build(cfg)
    model = train(cfg, out / "run")
    return before, model, out / "run"


def test_only_the_adapters_and_the_declared_parts_train(trained):
    before, model, _ = trained
    old = before.state_dict()
    new = model.state_dict()
    adapters = [k for k in new if ".lora_" in k]
    assert adapters and all(k.startswith("llm.") for k in adapters)
    assert {k.rsplit(".", 4)[-4] for k in adapters} == {"q_proj", "v_proj"}  # the named layers only
    for k, v in new.items():
        base = k.replace(".base_layer", "")
        if ".lora_B" in k:
            assert v.abs().sum() > 0, k  # B starts at zero: it moved
        elif ".lora_" in k:
            continue
        elif k.startswith("llm."):
            assert torch.equal(v, old[base]), k  # the LLM's own weights did not move
        elif k.startswith("encoders."):
            assert torch.equal(v, old[k]), k  # not declared trainable
    assert not torch.equal(new["connectors.image.net.0.weight"], old["connectors.image.net.0.weight"])


def test_the_checkpoint_holds_the_adapters_not_the_llm_and_reloads_with_the_same_logits(trained):
    _, model, run = trained
    stored = load_file(str(run / "final" / "model.safetensors"))
    llm_keys = [k for k in stored if k.startswith("llm.")]
    assert llm_keys and all(".lora_" in k for k in llm_keys)
    size_llm = sum(p.numel() for n, p in model.named_parameters() if n.startswith("llm.") and ".lora_" not in n)
    assert sum(stored[k].numel() for k in llm_keys) < size_llm / 20
    again = mmlm.load(run / "final")
    assert again.lora == {
        "llm": LoraOptions(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]).model_dump()
    }
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)
    # an adapter deleted from the file is refused, not loaded as its zero initialisation
    from safetensors.torch import save_file

    broken = run / "broken"
    broken.mkdir()
    for f in (run / "final").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    save_file({k: v for k, v in stored.items() if ".lora_B" not in k}, str(broken / "model.safetensors"))
    with pytest.raises(Exception, match="lora_B"):
        mmlm.load(broken)


def test_merging_gives_the_adapted_logits_and_plain_weights(trained, tmp_path):
    _, model, run = trained
    want = _logits(model)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmlm.cli",
            "export",
            str(run / "final"),
            "--format",
            "mmlm",
            "--merge-lora",
            "--out",
            str(tmp_path / "merged"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    merged = mmlm.load(tmp_path / "merged")
    assert merged.lora == {}
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged), want, rtol=1e-5, atol=1e-5)
    # the merged q_proj differs from the source's: the adapters' update is in the weights
    head = yaml_header(tmp_path / "merged")
    assert any("q_proj" in k for k in head["changed_from_source"])


def yaml_header(ck: Path) -> dict:
    import yaml

    return yaml.safe_load((ck / "mmlm.yaml").read_text())["mmlm"]


def test_export_of_a_model_with_adapters_needs_merge_lora(trained, tmp_path):
    _, _, run = trained
    r = subprocess.run(
        [sys.executable, "-m", "mmlm.cli", "export", str(run / "final"), "--out", str(tmp_path / "hf")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "--merge-lora" in r.stderr + r.stdout


def test_all_linear_adapts_every_linear_layer_but_the_head(tmp_path, source):
    cfg = parse_config(lora_raw(tmp_path / "d", source))
    model = build(cfg)
    attach(model, "llm", cfg.train.stages[0].lora["llm"], "lora.llm")
    wrapped = {k.split(".base_layer")[0].rsplit(".", 1)[-1] for k in model.state_dict() if ".base_layer" in k}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any(k.startswith("llm.lm_head") and "lora" in k for k in model.state_dict())
    merge_lora(model)
    assert not any("base_layer" in k for k in model.state_dict())


def test_lora_on_the_vision_encoder_trains_its_adapters_only(tmp_path, source):
    raw = lora_raw(tmp_path / "d", source, steps=2)
    raw["train"]["stages"][0]["lora"] = {"image": {"r": 2, "dropout": 0.0}}
    cfg = parse_config(raw)
    torch.manual_seed(0)
    before = build(cfg).state_dict()
    model = train(cfg, tmp_path / "run")
    after = model.state_dict()
    assert any(k.startswith("encoders.image.") and ".lora_" in k for k in after)
    for k, v in after.items():
        if k.startswith("encoders.image.") and ".lora_" not in k:
            assert torch.equal(v, before[k.replace(".base_layer", "")]), k
        if k.startswith("llm."):
            assert torch.equal(v, before[k]), k  # not adapted and not trainable
    torch.testing.assert_close(_logits(mmlm.load(tmp_path / "run" / "final")), _logits(model), rtol=0, atol=0)


def test_bad_lora_configs_name_their_key(tmp_path, source):
    raw = lora_raw(tmp_path / "d", source)
    raw["train"]["stages"][0]["lora"] = {"audio": {"r": 4}}
    with pytest.raises(ConfigError, match=r"train\.stages\.0\.lora\.audio.*no part 'audio'"):
        parse_config(raw)
    raw["train"]["stages"][0]["lora"] = {"llm": {"rank": 4}}
    with pytest.raises(ConfigError, match="rank"):
        parse_config(raw)
    cfg = parse_config(lora_raw(tmp_path / "d", source, target_modules=["qkv"]))
    with pytest.raises(ConfigError, match=r"lora\.llm\.target_modules.*qkv.*q_proj"):
        train(cfg, tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_qlora_without_cuda_or_bitsandbytes_is_a_clear_error(tmp_path, source):
    cfg = parse_config(lora_raw(tmp_path / "d", source, quantize="nf4"))
    with pytest.raises(ConfigError, match=r"lora\.llm\.quantize.*needs a CUDA device"):
        train(cfg, tmp_path / "run")


def test_a_later_stage_must_keep_the_adapters_settings(tmp_path, source):
    raw = lora_raw(tmp_path / "d", source, steps=1)
    second = json.loads(json.dumps(raw["train"]["stages"][0]))
    second["name"] = "more"
    second["lora"]["llm"]["r"] = 8
    raw["train"]["stages"].append(second)
    with pytest.raises(ConfigError, match=r"train\.stages\.1\.lora\.llm.*same settings"):
        train(parse_config(raw), tmp_path / "run")


def test_a_run_killed_in_a_lora_stage_resumes_to_the_same_weights(tmp_path, source):
    """align (no adapters) -> instruct (LoRA on the llm) -> more (the same adapters): killed in the
    second and in the third stage, resumed, the final weights equal an uninterrupted run's."""
    from mmlm.errors import TrainingInterrupted

    raw = tiny_raw(str(tmp_path / "d"), n=12, steps=3)
    raw["model"]["llm"] = {"type": "hf", "path": str(source)}
    lora = {"llm": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}}
    raw["train"]["stages"][1].update(lora=lora, trainable=["connectors.*"])
    third = json.loads(json.dumps(raw["train"]["stages"][1]))
    third["name"] = "more"
    raw["train"]["stages"].append(third)
    cfg = parse_config(raw)
    full = train(cfg, tmp_path / "full")
    for cut_at in (5, 8):  # step 2 of instruct, step 2 of more
        with pytest.raises(TrainingInterrupted):
            train(cfg, tmp_path / f"cut{cut_at}", stop_after=cut_at)
        resumed = train(cfg, tmp_path / f"cut{cut_at}", resume=True)
        a, b = full.state_dict(), resumed.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (cut_at, k)
