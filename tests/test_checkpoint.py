"""Checkpoints: those saved by the release before objectives became parts still load (their config
migrated, their logits unchanged); loading is strict; only what differs from a pretrained source is
stored."""

import logging
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import mmlm
from mmlm.checkpoint import read_checkpoint_config
from mmlm.config import parse_config
from mmlm.errors import CheckpointError
from mmlm.model import build
from tests.helpers import TEXTS, TINY_VIT, tiny_raw

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["legacy-sea", "legacy-sea-fusion"])
def test_a_format_1_checkpoint_loads_with_the_logits_it_was_saved_with(name, caplog):
    with caplog.at_level(logging.WARNING, logger="mmlm.checkpoint"):
        model = mmlm.load(DATA / name)
    notes = [r.getMessage() for r in caplog.records if "migrated" in r.getMessage()]
    assert len(notes) == 1 and "sea around mlp" in notes[0]
    ref = load_file(str(DATA / f"{name}.logits.safetensors"))
    messages = [[{"role": "user", "content": "<image>\ndescribe the image."}]]
    batch = model.processor(messages, [{"image": [Image.open(DATA / "scene.png")]}], add_generation_prompt=True)
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    with torch.no_grad():
        logits = model(**model.inputs(batch)).logits
    assert torch.allclose(logits, ref["logits"], atol=1e-6)


def test_a_format_1_config_becomes_the_inner_connector_and_a_sea_objective():
    cfg, meta = read_checkpoint_config(DATA / "legacy-sea-fusion")
    assert cfg.model.connectors["image"].type == "mlp"
    assert cfg.model.connectors["image"].options() == {"depth": 2, "fusion": "scalar_mix"}
    align, instruct = cfg.train.stages
    # weight 0.5 everywhere but instruct, where stage_weights turned it off
    assert [(o.type, o.options()) for o in align.objectives] == [
        ("lm", {}),
        ("sea", {"temperature": 0.1, "weight": 0.5}),
    ]
    assert [o.type for o in instruct.objectives] == ["lm"]
    assert meta["renames"] == {"connectors.image.inner.inner.": "connectors.image.inner."}
    plain, meta = read_checkpoint_config(DATA / "legacy-sea")
    assert meta["renames"] == {"connectors.image.inner.": "connectors.image."}


def test_a_migrated_checkpoint_saves_in_the_current_format(tmp_path):
    model = mmlm.load(DATA / "legacy-sea")
    model.save(tmp_path / "ck")
    doc = yaml.safe_load((tmp_path / "ck" / "mmlm.yaml").read_text())
    assert doc["mmlm"]["format"] == 2 and doc["model"]["connectors"]["image"]["type"] == "mlp"
    assert "connectors.image.net.0.weight" in load_file(str(tmp_path / "ck" / "model.safetensors"))


@pytest.fixture()
def saved(tmp_path):
    cfg = parse_config(tiny_raw())
    torch.manual_seed(0)
    model = build(cfg, texts=TEXTS)
    model.save(tmp_path / "ck")
    return model, tmp_path / "ck"


def test_a_checkpoint_missing_a_tensor_is_refused(saved):
    _, ck = saved
    tensors = load_file(str(ck / "model.safetensors"))
    del tensors["connectors.image.net.2.weight"]
    save_file(tensors, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*connectors.image.net.2.weight"):
        mmlm.load(ck)


def test_a_config_that_no_longer_matches_its_tensors_is_refused(saved):
    _, ck = saved
    doc = yaml.safe_load((ck / "mmlm.yaml").read_text())
    doc["model"]["connectors"]["image"]["depth"] = 3  # one more layer than the file holds
    (ck / "mmlm.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(CheckpointError, match="missing"):
        mmlm.load(ck)


def test_only_what_differs_from_a_pretrained_source_is_stored(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)).save_pretrained(tmp_path / "vit")
    raw = tiny_raw()
    raw["model"]["encoders"]["image"] = {"type": "hf", "path": str(tmp_path / "vit")}
    model = build(parse_config(raw), texts=TEXTS)
    model.save(tmp_path / "a")
    stored = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert stored and not any(k.startswith("encoders.") for k in stored)  # the tower is referenced
    with torch.no_grad():  # a change made outside mmlm's trainer is noticed too
        model.encoders["image"].model.post_layernorm.weight.add_(1.0)
    model.save(tmp_path / "b")
    stored = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert [k for k in stored if k.startswith("encoders.")] == ["encoders.image.model.post_layernorm.weight"]
    again = mmlm.load(tmp_path / "b")
    assert torch.equal(
        again.encoders["image"].model.post_layernorm.weight, model.encoders["image"].model.post_layernorm.weight
    )


CHANGED_LLM_TENSOR = "llm.model.layers.1.mlp.down_proj.weight"


@pytest.fixture()
def delta(tmp_path):
    """A model on a pretrained LLM folder whose connector and one LLM layer were changed, saved as a
    delta (the default): returns the model and its checkpoint."""
    from mmlm.llm import ScratchOptions, load_scratch
    from tests.helpers import TINY_LLM

    torch.manual_seed(0)
    source = load_scratch(ScratchOptions(**{k: v for k, v in TINY_LLM.items() if k != "type"}), texts=TEXTS)
    source.model.save_pretrained(tmp_path / "llm")
    source.tokenizer.save_pretrained(tmp_path / "llm")
    raw = tiny_raw()
    raw["model"]["llm"] = {"type": "hf", "path": str(tmp_path / "llm")}
    model = build(parse_config(raw))
    with torch.no_grad():
        model.connectors["image"].net[0].weight.add_(0.5)
        model.get_parameter(CHANGED_LLM_TENSOR).add_(0.5)
    model.eval()
    model.save(tmp_path / "ck")
    return model, tmp_path / "ck"


def _logits(model):
    messages = [[{"role": "user", "content": "<image>\nwhat color is the circle?"}]]
    batch = model.processor(messages, [{"image": [Image.open(DATA / "scene.png")]}], add_generation_prompt=True)
    with torch.no_grad():
        return model(**model.inputs(batch)).logits


def test_a_delta_checkpoint_holds_the_changed_tensors_and_loads_with_the_same_logits(delta):
    model, ck = delta
    stored = load_file(str(ck / "model.safetensors"))
    own = [k for k in model.state_dict() if not k.startswith("llm.")]  # encoder, connector: not from a source
    assert set(stored) == {*own, CHANGED_LLM_TENSOR}
    assert torch.equal(stored["connectors.image.net.0.weight"], model.connectors["image"].net[0].weight)
    # the folder still holds the LLM as it was: the changed layer reaches the loaded model from the file
    from_folder = build(read_checkpoint_config(ck)[0])
    assert not torch.equal(from_folder.get_parameter(CHANGED_LLM_TENSOR), stored[CHANGED_LLM_TENSOR])
    again = mmlm.load(ck)
    assert torch.equal(again.get_parameter(CHANGED_LLM_TENSOR), stored[CHANGED_LLM_TENSOR])
    assert torch.equal(_logits(again), _logits(model))


@pytest.mark.parametrize(
    "name",
    [
        "connectors.image.net.0.weight",
        CHANGED_LLM_TENSOR,  # changed from the source when saved: the source's would load silently
    ],
)
def test_a_delta_checkpoint_missing_a_tensor_is_refused_naming_it(delta, name):
    _, ck = delta
    tensors = load_file(str(ck / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing.*{name}"):
        mmlm.load(ck)


def test_a_pretrained_source_that_changed_since_the_save_is_refused_naming_the_part(tmp_path):
    """A checkpoint references its pretrained tower; if the folder (or a hub branch) later gives other
    weights, loading would silently mix them with the trained connector: it is refused instead."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmlm.checkpoint import load
    from mmlm.config import parse_config
    from mmlm.errors import CheckpointError
    from mmlm.model import build
    from tests.helpers import TINY_VIT, tiny_raw

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)).save_pretrained(tmp_path / "tower")
    raw = tiny_raw()
    raw["model"]["encoders"]["image"] = {"type": "hf", "path": str(tmp_path / "tower"), "select_layers": [-2]}
    model = build(parse_config(raw), texts=["a red circle"])
    model.save(tmp_path / "ck")
    assert load(tmp_path / "ck").encoders["image"].pretrained  # the same source: loads
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)).save_pretrained(tmp_path / "tower")  # rewritten
    with pytest.raises(CheckpointError, match="source of model.encoders.image now gives other weights"):
        load(tmp_path / "ck")
