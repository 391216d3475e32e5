"""Sequence packing (``packing: true``; Processor.collate_packed, pack_rows): a micro-batch packed
into fewer rows gives the loss, the gradients and the per-sample logits of the same samples
unpacked, with SDPA and eager attention; a packed stage trains to the weights of an unpacked one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.data.sources import read_source
from mmlm.errors import ConfigError
from mmlm.model import build
from mmlm.objectives.lm import causal_lm_loss
from mmlm.processor import pack_rows
from mmlm.train.runner import train
from tests.helpers import tiny_raw


def test_first_fit_decreasing_rows():
    assert pack_rows([5, 4, 3, 3, 2], 8) == [[0, 2], [1, 3], [4]]
    assert pack_rows([8, 8], 8) == [[0], [1]]
    rows = pack_rows([7, 1, 6, 2, 5, 3, 4, 4], 10)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum([7, 1, 6, 2, 5, 3, 4, 4][i] for i in r) <= 10 for r in rows) and len(rows) == 4


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")  # the shapes world is generated there on first read
    raw = tiny_raw(str(d), n=12)
    cfg = parse_config(raw)
    recs = []
    for st in cfg.train.stages:  # captions and multi-turn VQA: lengths from ~20 to ~90 tokens
        recs += read_source(st.data[0])[:4]
    texts = [t for r in recs for t in r.texts()]
    return raw, recs, texts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_unpacked_loss_gradients_and_logits(samples, attn):
    raw, recs, texts = samples
    raw = json.loads(json.dumps(raw))
    raw["model"]["llm"]["attn_implementation"] = attn
    torch.manual_seed(0)
    model = build(parse_config(raw), texts=texts)
    model.train()
    data = StageDataset(recs, model.processor, "error")
    enc = [data.load(i) for i in range(len(data))]
    plain = model.processor.collate(enc)
    packed = model.processor.collate_packed(enc, model.processor.config.max_length)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # fewer rows
    assert int(packed["sequence_lengths"].sum()) == int(plain["attention_mask"].sum())

    def run(batch):
        model.zero_grad(set_to_none=True)
        out = model(**model.inputs(batch))
        loss = causal_lm_loss(out.logits, batch["labels"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), out.logits.detach(), grads

    l1, logits1, g1 = run(plain)
    l2, logits2, g2 = run(packed)
    assert abs(l1.item() - l2.item()) <= 1e-5
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-5, rtol=1e-4, msg=n)
    # each sample's logits in its packed row are its logits alone
    rows = pack_rows([len(e.input_ids) for e in enc], model.processor.config.max_length)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(enc[i].input_ids)
            torch.testing.assert_close(logits2[r, at : at + n], logits1[i, :n], atol=1e-5, rtol=1e-4)
            at += n


def test_a_packed_stage_trains_to_the_unpacked_weights(samples, tmp_path, monkeypatch):
    from mmlm.processor import Processor

    rows = []
    pack = Processor.collate_packed

    def counted(self, enc, budget):
        batch = pack(self, enc, budget)
        rows.append((len(enc), batch["input_ids"].shape[0]))
        return batch

    monkeypatch.setattr(Processor, "collate_packed", counted)
    raw = json.loads(json.dumps(samples[0]))
    for st in raw["train"]["stages"]:
        st["lr"] = 1e-4
    plain = train(parse_config(raw), tmp_path / "plain")
    for st in raw["train"]["stages"]:
        st["packing"] = True
    packed = train(parse_config(raw), tmp_path / "packed")
    assert packed is not None and plain is not None
    assert len(rows) == 12 and all(n == 4 for n, _ in rows) and sum(r for _, r in rows) < 4 * 12  # it packed
    a = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "packed" / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    m1 = json.loads((tmp_path / "plain" / "metrics.json").read_text())["stages"]["instruct"]
    m2 = json.loads((tmp_path / "packed" / "metrics.json").read_text())["stages"]["instruct"]
    assert abs(m1["final_loss"] - m2["final_loss"]) <= 1e-4


def test_packing_options_that_cannot_work_are_refused_by_key(samples, tmp_path):
    raw = json.loads(json.dumps(samples[0]))
    raw["train"]["stages"][1].update(packing=True, pack_tokens=50)
    with pytest.raises(ConfigError) as err:
        train(parse_config(raw), tmp_path / "short")
    assert err.value.path == "train.stages.1.pack_tokens" and "max_length 96" in str(err.value)
    raw["train"]["stages"][1].update(packing=False, pack_tokens=200)
    with pytest.raises(ConfigError) as err:
        train(parse_config(raw), tmp_path / "off")
    assert err.value.path == "train.stages.1.pack_tokens" and "packing: true" in str(err.value)
