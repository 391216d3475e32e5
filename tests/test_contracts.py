"""Contracts every registered part keeps, checked for each part the registries hold: a connector,
encoder or objective is covered the day it registers."""

import copy
import json

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from mmlm.config import Component, parse_config
from mmlm.connectors import build_connector
from mmlm.errors import ConfigError
from mmlm.model import build
from mmlm.objectives import StepInfo, build_objectives
from mmlm.registry import CONNECTORS, ENCODERS, OBJECTIVES, REDUCERS
from tests.helpers import TEXTS, tiny_raw

IN_DIM, OUT_DIM = 32, 64


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=OUT_DIM,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    ).eval()


def make_connector(name, llm, seed=0):
    torch.manual_seed(seed)
    comp = Component(type=name, **CONNECTORS.get(name).example)
    return build_connector(comp, IN_DIM, OUT_DIM, llm=llm, where="model.connectors.image").eval()


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_connector_output_count_is_known_before_the_forward(name, llm):
    conn = make_connector(name, llm)
    for n in (16, 64):  # 4x4 and 8x8 grids
        out = conn(torch.randn(2, n, IN_DIM))
        assert tuple(out.shape) == (2, conn.num_output_tokens(n), OUT_DIM)


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_connector_state_dict_round_trips(name, llm):
    a, b = make_connector(name, llm, seed=0), make_connector(name, llm, seed=1)
    x = torch.randn(2, 16, IN_DIM)
    assert not torch.allclose(a(x), b(x))  # differently initialised: the load below has work to do
    b.load_state_dict(a.state_dict())  # strict: the same keys and shapes
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_connector_holds_no_llm_weight(name, llm):
    conn = make_connector(name, llm)
    llm_storage = {p.untyped_storage().data_ptr() for p in llm.parameters()}
    for key, t in conn.state_dict().items():
        assert t.untyped_storage().data_ptr() not in llm_storage, key
    assert not any(k.startswith("llm") or ".llm." in k for k in conn.state_dict())


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_connector_unknown_option_is_rejected_with_its_key_path(name):
    raw = tiny_raw()
    raw["model"]["connectors"]["image"] = {"type": name, **CONNECTORS.get(name).example, "no_such_option": 1}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.path == "model.connectors.image.no_such_option"
    assert "unknown key" in str(err.value)


def make_reducer(name):
    entry = REDUCERS.get(name)
    assert entry.example, f"reducer {name!r} is registered without example= options for the contract tests"
    return REDUCERS.create(Component(type=name, **entry.example), where="model.token_reduction.image")


@pytest.mark.parametrize("name", REDUCERS.names())
def test_reducer_output_count_is_known_before_the_forward(name):
    red = make_reducer(name)
    for n in (16, 144, 17):
        x = torch.randn(2, n, OUT_DIM)
        out = red.merge(x)
        assert tuple(out.shape) == (2, red.num_output_tokens(n), OUT_DIM)
        assert out.shape[1] <= n


@pytest.mark.parametrize("name", REDUCERS.names())
def test_reducer_schedule_is_fractions_of_existing_layers(name):
    red = make_reducer(name)
    schedule = red.keep_schedule(4)
    assert bool(schedule) == red.prunes
    assert all(0 <= layer < 4 and 0 <= f <= 1 for layer, f in schedule.items())
    fracs = [schedule[k] for k in sorted(schedule)]
    assert fracs == sorted(fracs, reverse=True)  # a later layer never reads more than an earlier one


@pytest.mark.parametrize("name", REDUCERS.names())
def test_reducer_unknown_option_is_rejected_with_its_key_path(name):
    raw = tiny_raw()
    raw["model"]["token_reduction"] = {"image": {"type": name, **REDUCERS.get(name).example, "no_such_option": 1}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.path == "model.token_reduction.image.no_such_option"


def make_encoder(name, seed=0):
    entry = ENCODERS.get(name)
    assert entry.example, f"encoder {name!r} is registered without example= options for the contract tests"
    torch.manual_seed(seed)
    return ENCODERS.create(Component(type=name, **copy.deepcopy(entry.example)), where="model.encoders.image").eval()


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_declares_what_its_forward_returns(name):
    enc = make_encoder(name)
    if enc.modality == "audio":  # any length in, its own window out
        import numpy as np

        clips = [enc.preprocess(np.sin(np.arange(n) / 40).astype(np.float32)) for n in (3000, 50000)]
        assert clips[0].shape == clips[1].shape
        feats = enc(torch.stack(clips))
    elif enc.modality == "video":  # any number of frames of any size in, its own frame count and size out
        h, w = enc.preprocess.size
        n = enc.preprocess.num_frames
        clips = [enc.preprocess([Image.new("RGB", (w + 7, h + 3), (20 * k, 30, 30)) for k in range(t)]) for t in (1, 9)]
        assert all(tuple(c.shape) == (n, 3, h, w) for c in clips)
        feats = enc(torch.stack(clips))
    else:
        h, w = enc.preprocess.size
        pixels = enc.preprocess(Image.new("RGB", (w + 7, h + 3), (200, 30, 30)))  # any size in, its own size out
        assert tuple(pixels.shape) == (3, h, w)
        feats = enc(torch.stack([pixels, torch.zeros_like(pixels)]))
    assert tuple(feats.shape) == (2, enc.num_tokens, enc.hidden_size)


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_state_dict_round_trips(name):
    a, b = make_encoder(name, seed=0), make_encoder(name, seed=1)
    if a.modality == "audio":
        x = torch.randn(1, *a.preprocess(torch.randn(1000)).shape)
    elif a.modality == "video":
        x = torch.randn(1, a.preprocess.num_frames, 3, *a.preprocess.size)
    else:
        x = torch.randn(1, 3, *a.preprocess.size)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_unknown_option_is_rejected_with_its_key_path(name):
    raw = tiny_raw()
    raw["model"]["encoders"]["image"] = {"type": name, **ENCODERS.get(name).example, "no_such_option": 1}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.path == "model.encoders.image.no_such_option"


# ------------------------------------------------------------------------------------ objectives


@pytest.fixture(scope="module")
def tiny_batch(tmp_path_factory):
    """A tiny model and a two-sample batch of shapes-world captions (with per-patch labels)."""
    from mmlm.data.dataset import StageDataset
    from mmlm.data.sources import read_source

    cfg = parse_config(tiny_raw(str(tmp_path_factory.mktemp("shapes")), n=4))
    st = cfg.train.stages[0]
    records = read_source(st.data[0])
    torch.manual_seed(0)
    model = build(cfg, texts=TEXTS + [t for r in records for t in r.texts()])
    data = StageDataset(records, model.processor)
    return model, model.processor.collate([data.load(0), data.load(1)])


@pytest.fixture(scope="module")
def tiny_pairs(tiny_batch, tmp_path_factory):
    """The same model and a pairs batch (``data_kind: pairs``): colour squares as queries, their
    colour names as positives, one hard negative each."""
    from mmlm.data.dataset import StageDataset
    from mmlm.data.pairs import PairsOptions, read_pairs

    model, _ = tiny_batch
    d = tmp_path_factory.mktemp("pairs")
    rows = []
    for name, rgb, other in (("red", (220, 20, 20), "blue"), ("blue", (20, 20, 220), "green")):
        Image.new("RGB", (32, 32), rgb).save(d / f"{name}.png")
        rows.append({"query": {"image": f"{name}.png"}, "positive": {"text": name}, "negatives": [{"text": other}]})
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = StageDataset(
        read_pairs(PairsOptions(path=str(d / "pairs.jsonl"))), model.processor, embedding=model.config.model.embedding
    )
    return model, data.collate([data.load(0), data.load(1)])


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_returns_finite_losses_that_reach_the_model(name, tiny_batch, tiny_pairs):
    kind = OBJECTIVES.get(name).target.data_kind
    model, batch = tiny_pairs if kind == "pairs" else tiny_batch
    raw = tiny_raw("/unused")
    raw["train"]["stages"][0]["objectives"] = [{"type": name, **OBJECTIVES.get(name).example}]
    if kind == "pairs":
        raw["train"]["stages"][0]["data"] = [{"format": "pairs", "path": "/unused.jsonl"}]
    stage = parse_config(raw).train.stages[0]
    (objective,) = build_objectives(stage, model, "train.stages.0")
    model.train()
    model.zero_grad()
    step = StepInfo("align", 0, lambda purpose: 1234)
    if objective.handles_backward:  # it back-propagates itself (objectives/_base.py)
        losses = objective.backward_step(batch, step, 1.0, lambda loss: loss.backward())
    else:
        out = None  # on pairs data the trainer runs no forward: the objective embeds the batch itself
        if kind == "conversations":
            out = model(**model.inputs(batch), output_hidden_states=objective.needs_hidden_states)
        losses = objective(out, batch, step)
        sum(losses.values()).backward()
    assert losses and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connectors.parameters())
    model.zero_grad()


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_unknown_option_is_rejected_with_its_key_path(name):
    raw = tiny_raw("/unused")
    raw["train"]["stages"][1]["objectives"] = [{"type": name, **OBJECTIVES.get(name).example, "no_such_option": 1}]
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.path == "train.stages.1.objectives.0.no_such_option"
