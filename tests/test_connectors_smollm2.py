"""AlignVLM and Ovis on top of a real LLM (SmolLM2-135M-Instruct from its GGUF file, 49k vocabulary):
a forward and backward pass through the LLM with ``inputs_embeds``."""

from __future__ import annotations

import pytest
import torch

from mmlm.config import Component
from mmlm.connectors import build_connector


@pytest.fixture
def frozen_llm(smollm2):
    """The session's SmolLM2 with its weights frozen for the test (gradients still flow through it)."""
    llm = smollm2.model
    flags = [p.requires_grad for p in llm.parameters()]
    for p in llm.parameters():
        p.requires_grad_(False)
    llm.eval()
    yield smollm2
    for p, f in zip(llm.parameters(), flags, strict=False):
        p.requires_grad_(f)
        p.grad = None


def _forward_backward(loaded, conn, n_images=2, n_tokens=16, in_dim=32):
    llm, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(0)
    feats = torch.randn(n_images, n_tokens, in_dim)
    visual = conn(feats)  # the LLM was bound when the connector was built
    D = llm.get_input_embeddings().weight.shape[1]
    assert visual.shape[0] == n_images and visual.shape[2] == D
    ids = torch.tensor([tok("Describe the picture: a red circle.", add_special_tokens=False)["input_ids"]] * n_images)
    text = llm.get_input_embeddings()(ids)
    embeds = torch.cat([visual.to(text.dtype), text], dim=1)
    labels = torch.cat([torch.full(visual.shape[:2], -100), ids], dim=1)
    out = llm(inputs_embeds=embeds, labels=labels, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    return visual


def test_alignvlm_on_smollm2_forward_backward(frozen_llm):
    llm = frozen_llm.model
    E = llm.get_input_embeddings().weight
    V, D = E.shape
    assert V > 49_000 and D == 576
    conn = build_connector(Component(type="alignvlm", chunk_tokens=8), 32, D, llm=llm)
    # W2 is a copy of the output head (tied to E in SmolLM2), E itself is not part of the connector
    assert conn.w2.weight.shape == (V, D) and torch.equal(conn.w2.weight, llm.get_output_embeddings().weight)
    assert all(t.data_ptr() != E.data_ptr() for t in conn.state_dict().values())
    assert not any(k.endswith("embed_tokens.weight") for k in conn.state_dict())
    rows = []
    orig = conn._probs
    conn._probs = lambda f1: (rows.append(f1.shape[0]), orig(f1))[1]
    visual = _forward_backward(frozen_llm, conn)  # 2 images x 16 tokens against the 49k vocabulary
    assert visual.shape == (2, 16, D)
    assert max(rows) <= 8  # at most one [8, V] matrix at a time
    for name in ("w1.weight", "w2.weight", "ln1.weight", "ln2.weight"):
        g = dict(conn.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    # each visual token is a convex mix of SmolLM2's embeddings
    lo, hi = E.detach().min(0).values, E.detach().max(0).values
    assert bool((visual >= lo - 1e-4).all()) and bool((visual <= hi + 1e-4).all())


def test_ovis_on_smollm2_forward_backward(frozen_llm):
    llm = frozen_llm.model
    E = llm.get_input_embeddings().weight.detach().float()
    D = E.shape[1]
    conn = build_connector(Component(type="ovis", vocab_size=1024, init_from_llm=True), 32, D, llm=llm)
    w = conn.vte.weight.detach()
    assert abs(float(w.mean()) - float(E.mean())) < 0.1 * float(E.std())
    assert abs(float(w.std()) - float(E.std())) < 0.05 * float(E.std())
    visual = _forward_backward(frozen_llm, conn)
    assert visual.shape == (2, 18, D)
    assert torch.equal(visual[:, 0].detach(), w[1022].expand(2, -1))
    assert torch.equal(visual[:, -1].detach(), w[1023].expand(2, -1))
    for name in ("head.weight", "head_norm.weight", "vte.weight"):
        g = dict(conn.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
