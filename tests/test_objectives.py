"""Objectives named by a stage: the default, key-path errors, the replaced ``objective`` key, the
lm loss against transformers' own, and weights."""

import pytest
import torch

from mmlm.config import parse_config
from mmlm.errors import ConfigError
from mmlm.model import build
from mmlm.objectives import StepInfo, build_objectives
from mmlm.objectives.lm import causal_lm_loss
from mmlm.registry import OBJECTIVES
from mmlm.train.runner import Trainer
from tests.helpers import TEXTS, tiny_raw


def stage_raw(**stage):
    raw = tiny_raw("/unused")
    raw["train"]["stages"][1].update(stage)
    return raw


def test_a_stage_optimises_the_lm_loss_unless_it_says_otherwise():
    cfg = parse_config(tiny_raw("/unused"))
    assert [[o.type for o in st.objectives] for st in cfg.train.stages] == [["lm"], ["lm"]]


def test_objectives_are_looked_up_by_exact_name_with_the_key_path():
    with pytest.raises(ConfigError) as err:
        parse_config(stage_raw(objectives=[{"type": "lm"}, {"type": "SEA"}]))
    assert err.value.path == "train.stages.1.objectives.1.type"
    assert f"valid choices: {', '.join(OBJECTIVES.names())}" in str(err.value) and "sea" in OBJECTIVES.names()


def test_objective_options_are_typed_with_the_key_path():
    with pytest.raises(ConfigError) as err:
        parse_config(stage_raw(objectives=[{"type": "sea", "temperature": -1}]))
    assert err.value.path == "train.stages.1.objectives.0.temperature"
    with pytest.raises(ConfigError) as err:
        parse_config(stage_raw(objectives=[{"type": "lm", "weight": "heavy"}]))
    assert err.value.path == "train.stages.1.objectives.0.weight"


def test_the_old_objective_key_names_its_replacement():
    with pytest.raises(ConfigError) as err:
        parse_config(stage_raw(objective="contrastive"))
    assert err.value.path == "train.stages.1.objective"
    assert "replaced by 'objectives'" in str(err.value) and "{type: lm}" in str(err.value)


def test_an_objective_listed_twice_is_refused():
    with pytest.raises(ConfigError) as err:
        parse_config(stage_raw(objectives=[{"type": "lm"}, {"type": "lm", "weight": 2}]))
    assert "train.stages.1.objectives" in str(err.value) and "more than once" in str(err.value)


def test_an_objective_for_a_modality_the_model_lacks_fails_at_build():
    cfg = parse_config(stage_raw(objectives=[{"type": "sea", "modality": "audio"}]))
    model = build(cfg, texts=TEXTS)
    with pytest.raises(ConfigError) as err:
        build_objectives(cfg.train.stages[1], model, "train.stages.1")
    assert err.value.path == "train.stages.1.objectives.0.modality"


def test_lm_objective_equals_the_llms_own_loss():
    cfg = parse_config(tiny_raw())
    torch.manual_seed(0)
    model = build(cfg, texts=TEXTS)
    batch = model.processor(
        [
            [{"role": "user", "content": "what color is the circle?"}, {"role": "assistant", "content": "red"}],
            [{"role": "user", "content": "how many objects are there?"}, {"role": "assistant", "content": "two three"}],
        ],
        add_generation_prompt=False,
    )
    out = model(**model.inputs(batch), labels=batch["labels"])  # transformers computes its loss
    ours = causal_lm_loss(out.logits, batch["labels"])
    assert torch.allclose(ours, out.loss, atol=1e-6)
    shifted = batch["labels"].clone()
    shifted[0, -2] = -100  # one supervised token fewer: a different mean
    assert not torch.allclose(causal_lm_loss(out.logits, shifted), out.loss)


def test_weights_scale_each_objectives_losses(tmp_path):
    raw = tiny_raw(str(tmp_path / "shapes"), n=8)
    raw["train"]["stages"][0]["objectives"] = [{"type": "lm", "weight": 0.5}, {"type": "sea", "weight": 3.0}]
    cfg = parse_config(raw)
    trainer = Trainer(cfg, tmp_path / "run")
    model = build(cfg, texts=trainer.tokenizer_texts())
    run = trainer._start_stage(model, cfg.train.stages[0], 0, resume=False)
    batch = next(run.batches)
    batch.pop("_skipped")
    position = batch["_position"]
    batch = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    weighted = trainer._losses(run, dict(batch))
    out = model(**model.inputs(batch))
    info = StepInfo("align", position, lambda p: 0)
    lm, sea = (obj(out, batch, info) for obj in run.objectives)
    assert torch.allclose(weighted["lm"], 0.5 * lm["lm"]) and torch.allclose(weighted["sea"], 3.0 * sea["sea"])


def test_objective_words_join_a_from_scratch_tokenizer(tmp_path):
    raw = tiny_raw(str(tmp_path / "shapes"), n=4)
    raw["train"]["stages"][0]["objectives"] = [
        {"type": "lm"},
        {
            "type": "sea",
            "labels": "open_clip",
            "word_list": ["zebra", "xylophone"],
            "open_clip": {"model_name": "ViT-B-32", "weights": "/unused.bin"},
        },
    ]
    texts = Trainer(parse_config(raw), tmp_path / "run").tokenizer_texts()
    assert {"zebra", "xylophone"} <= set(texts)
    assert any("red" in t for t in texts)  # and the records' own texts and patch labels


def test_sea_as_a_connector_points_to_the_objective():
    raw = tiny_raw()
    raw["model"]["connectors"]["image"] = {"type": "sea", "inner": {"type": "mlp"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.path == "model.connectors.image.type"
    assert "unknown connector 'sea'" in str(err.value) and "objectives" in str(err.value)
