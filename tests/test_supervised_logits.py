"""The LM head runs on the supervised positions only (``Objective.logits``, ``logits_to_keep``): the
lm loss and its gradients are those of the full logits, the logits tensor holds only the positions
some row learns from, and a stage trains to the same weights either way."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import mmlm.train.runner as runner
from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.data.sources import read_source
from mmlm.model import MultimodalLM, build
from mmlm.objectives.lm import LMObjective, causal_lm_loss, supervised_cells, supervised_positions, token_loss
from mmlm.processor import IGNORE_INDEX
from mmlm.train.runner import train
from tests.helpers import tiny_raw


def test_the_head_on_supervised_positions_gives_the_full_loss_and_gradients(tmp_path):
    cfg = parse_config(tiny_raw(str(tmp_path / "d"), n=8))
    recs = read_source(cfg.train.stages[1].data[0])[:4] + read_source(cfg.train.stages[0].data[0])[:2]
    torch.manual_seed(0)
    model = build(cfg, texts=[t for r in recs for t in r.texts()])
    model.train()
    data = StageDataset(recs, model.processor, "error")
    batch = model.processor.collate([data.load(i) for i in range(len(data))])
    labels = batch["labels"]
    keep = supervised_positions(labels)
    # by hand: positions t where some row's label at t + 1 is learnt
    want = sorted(
        {t for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1) if labels[b, t + 1] != IGNORE_INDEX}
    )
    assert keep.tolist() == want and 0 < len(want) < labels.shape[1] // 2

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = model(**model.inputs(batch), **kw)
        loss = token_loss(out.logits, out.targets_for(labels))
        loss.backward()
        return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, l1, g1 = run()
    part, l2, g2 = run(logits_to_keep=keep)
    assert part.logits.shape[1] == len(want) and full.logits.shape[1] == labels.shape[1]
    assert torch.equal(part.logits, full.logits[:, keep])
    assert abs(l1.item() - causal_lm_loss(full.logits, labels).item()) < 1e-7
    assert abs(l1.item() - l2.item()) <= 1e-6
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)
    # the forward's own loss with labels agrees too
    assert abs(model(**model.inputs(batch), labels=labels, logits_to_keep=keep).loss.item() - l1.item()) <= 1e-6


def test_the_head_on_exact_cells_costs_each_rows_own_answers_with_the_full_loss_and_gradients(tmp_path, monkeypatch):
    """Multi-turn rows have their answers at different positions: the union of positions covers more
    cells than the rows learn from (SmolLM2 on 16 shapes-world samples of 5 questions: 400 against
    244). The head on the exact (row, position) cells gives the full loss and gradients; an LLM whose
    head cannot be split off falls back to the union."""
    cfg = parse_config(tiny_raw(str(tmp_path / "d"), n=8))
    recs = read_source(cfg.train.stages[1].data[0])[:6]  # vqa: several questions per image
    torch.manual_seed(0)
    model = build(cfg, texts=[t for r in recs for t in r.texts()])
    model.train()
    data = StageDataset(recs, model.processor, "error")
    batch = model.processor.collate([data.load(i) for i in range(len(data))])
    labels = batch["labels"]
    cells = supervised_cells(labels)
    n_cells = int(cells.sum())
    assert model.llm_head_apart
    assert n_cells == int((labels[:, 1:] != IGNORE_INDEX).sum())  # every learnt next token, once
    assert n_cells < len(supervised_positions(labels)) * labels.shape[0]  # the union costs more cells

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = model(**model.inputs(batch), **kw)
        loss = token_loss(out.logits, out.targets_for(labels))
        loss.backward()
        return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, l1, g1 = run()
    part, l2, g2 = run(logits_to_keep=cells)
    assert part.logits.shape[:2] == (1, n_cells)
    torch.testing.assert_close(part.logits[0], full.logits[cells], atol=1e-6, rtol=1e-5)
    assert abs(l1.item() - l2.item()) <= 1e-6
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)
    assert abs(model(**model.inputs(batch), labels=labels, logits_to_keep=cells).loss.item() - l1.item()) <= 1e-6
    # a head that cannot run apart (soft-capped logits, say): the positions some row needs, same loss
    monkeypatch.setattr(MultimodalLM, "llm_head_apart", property(lambda self: False))
    union, l3, _ = run(logits_to_keep=cells)
    assert union.logits.shape[:2] == (labels.shape[0], len(supervised_positions(labels)))
    assert abs(l3.item() - l1.item()) <= 1e-6


def test_a_stage_trains_to_the_same_weights_with_the_head_on_supervised_positions(tmp_path, monkeypatch):
    raw = tiny_raw(str(tmp_path / "d"), n=16, steps=3, objectives=[{"type": "lm"}, {"type": "sea", "weight": 0.5}])
    kept = []
    choose = runner.logits_to_keep

    def spy(model, objectives, batch):
        k = choose(model, objectives, batch)
        kept.append(None if k is None else (int(k.sum()), batch["labels"].numel()))
        return k

    monkeypatch.setattr(runner, "logits_to_keep", spy)
    train(parse_config(raw), tmp_path / "part")
    assert len(kept) == 6 and all(k is not None and k[0] < k[1] for k in kept)
    monkeypatch.setattr(LMObjective, "logits", "all")  # as before: every logit
    kept.clear()
    train(parse_config(json.loads(json.dumps(raw))), tmp_path / "full")
    assert kept == [None] * 6
    a = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
