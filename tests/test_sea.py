"""SEA with labels from the data: the loss and the inference path (ALGORITHMS.md, SEA)."""

import math

import torch

from mmlm.config import Component, parse_config
from mmlm.connectors import build
from mmlm.connectors.sea import sea_loss
from mmlm.model import build as build_model
from tests.helpers import TEXTS, tiny_raw


def _orthonormal(k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    return q.T  # k orthonormal rows


def test_sea_loss_is_lowest_at_the_label_embeddings():
    words = ["red circle", "blue square", "green triangle", "background"]
    E = _orthonormal(len(words), 16)
    emb = dict(zip(words, E))
    labels = [["red circle", "background", "blue square"], ["green triangle", "background", "red circle"]]
    targets = torch.stack([torch.stack([emb[w] for w in row]) for row in labels])
    tau = 0.1
    at_targets = sea_loss(targets * 3.0, labels, emb.__getitem__, tau)  # the scale does not matter (cosine)
    # analytic value for orthonormal labels: -log(e^{1/tau} / (e^{1/tau} + (K - 1)))
    K = len(words)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (K - 1)))
    assert abs(float(at_targets) - expected) < 1e-5
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert float(sea_loss(torch.randn(targets.shape, generator=g), labels, emb.__getitem__, tau)) > float(at_targets)
    wrong = targets.roll(1, dims=1)  # every token given another token's embedding
    assert float(sea_loss(wrong, labels, emb.__getitem__, tau)) > float(at_targets) + 1.0


def _sea_model():
    raw = tiny_raw()
    raw["model"]["connectors"]["image"] = {"type": "sea", "inner": {"type": "mlp", "depth": 2}, "weight": 1.0,
                                           "stage_weights": {"vqa": 0.0}}
    torch.manual_seed(0)
    return build_model(parse_config(raw), texts=TEXTS + ["background"])


def test_inference_output_is_the_wrapped_connector_s():
    sea = build(Component(type="sea", inner={"type": "mlp", "depth": 2}), 32, 64)
    mlp = build(Component(type="mlp", depth=2), 32, 64)
    mlp.load_state_dict({k.removeprefix("inner."): v for k, v in sea.state_dict().items()})
    feats = torch.randn(2, 16, 32)
    labels = [{"4": ["red circle"] * 16}] * 2
    sea.eval()
    assert torch.equal(sea(feats, context={"meta": {"patch_labels": labels}, "training": False}), mlp(feats))


def test_sea_adds_a_loss_in_training_and_leaves_logits_unchanged():
    model = _sea_model()
    img = torch.zeros(2, 3, 32, 32)
    enc = [model.processor.encode([{"role": "user", "content": "<image>\nwhat color is the circle?"},
                                   {"role": "assistant", "content": "red"}], {"image": [img[0]]},
                                  meta={"patch_labels": [{"4": ["red circle"] * 8 + ["background"] * 8}]})
           for _ in range(2)]
    batch = model.processor.collate(enc)
    model.train()
    model.current_stage = "align"
    out_on = model(**batch)
    assert "image.sea" in out_on.aux_losses and float(out_on.aux_losses["image.sea"].detach()) > 0
    assert torch.allclose(out_on.loss, out_on.lm_loss + out_on.aux_losses["image.sea"])
    out_on.loss.backward()
    assert model.connectors["image"].inner.net[0].weight.grad.abs().sum() > 0
    model.current_stage = "vqa"  # stage weight 0: no loss
    assert "image.sea" not in model(**batch).aux_losses
    # identical logits with SEA active or not
    assert torch.equal(out_on.logits, model(**batch).logits)
    model.eval()
    with torch.no_grad():
        assert model(**batch).aux_losses == {}
