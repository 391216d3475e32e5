"""SEA: token-level semantic alignment, wrapped around any other connector.

During the stages that enable it, each visual token's connector output is pulled towards the LLM
input embedding of its word label (mean over the label's sub-word pieces) by an InfoNCE loss over
the distinct labels of the batch, and pushed away from the others. Labels come from the data (the
shapes world writes per-patch labels at several grid sizes). At inference, and in stages that do
not enable it, the output is exactly the wrapped connector's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from mmlm.connectors._base import Connector, ConnectorOptions, build, split_output
from mmlm.registry import CONNECTORS


class _Inner(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str

    def options(self) -> dict:
        return dict(self.model_extra or {})


class SEAOptions(ConnectorOptions):
    inner: dict[str, Any] = Field(default_factory=lambda: {"type": "mlp"})  # the wrapped connector
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(0.07, gt=0)
    label_key: str = "patch_labels"  # per-image annotation written by the data source
    stages: list[str] | None = None  # training stages where the loss is on (None: every stage)
    target_grad: bool = False  # let the loss move the LLM's word embeddings too


def sea_loss(tokens: torch.Tensor, labels: list[list[str]], embed_label, temperature: float, target_grad: bool = False):
    """InfoNCE between token outputs ``[n, M, D]`` and the embeddings of their labels."""
    flat = [lab for per_image in labels for lab in per_image]
    uniq = sorted(set(flat))
    index = {lab: i for i, lab in enumerate(uniq)}
    targets = torch.stack([embed_label(lab) for lab in uniq]).to(tokens.dtype)
    if not target_grad:
        targets = targets.detach()
    t = F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1)
    e = F.normalize(targets.float(), dim=-1)
    logits = t @ e.T / temperature
    y = torch.tensor([index[lab] for lab in flat], device=tokens.device)
    return F.cross_entropy(logits, y)


class SEAConnector(Connector):
    def __init__(self, opts: SEAOptions, in_dim: int, out_dim: int, llm=None):
        super().__init__(in_dim, out_dim)
        self.opts = opts
        inner = _Inner.model_validate(opts.inner)
        if inner.type == "sea":
            raise ValueError("model.connectors.*.inner: SEA cannot wrap another SEA")
        self.inner = build(inner, in_dim, out_dim, llm=llm, where="model.connectors.*.inner")

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.inner.num_output_tokens(num_input_tokens)

    def forward(self, feats, context: dict | None = None):
        tokens, aux = split_output(self.inner(feats, context=context))
        ctx = context or {}
        active = (
            self.training and ctx.get("training", False) and self.opts.weight > 0
            and (self.opts.stages is None or ctx.get("stage") in self.opts.stages)
        )
        labels = (ctx.get("meta") or {}).get(self.opts.label_key)
        if not active or not labels:
            return (tokens, aux) if aux else tokens
        M = tokens.shape[1]
        g = int(math.isqrt(M))
        per_image = []
        for k, lab in enumerate(labels):
            grid = lab.get(str(g)) if isinstance(lab, dict) else lab
            if grid is None or len(grid) != M:
                have = sorted(lab) if isinstance(lab, dict) else [len(lab)]
                raise ValueError(
                    f"SEA: image {k} has no {self.opts.label_key} for {M} tokens (a {g}x{g} grid); the data gives grids {have}"
                )
            per_image.append(grid)
        tok = ctx["tokenizer"]
        emb = ctx["llm"].get_input_embeddings()

        def embed_label(text: str) -> torch.Tensor:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return emb(torch.tensor(ids, device=tokens.device)).mean(0)

        loss = sea_loss(tokens, per_image, embed_label, self.opts.temperature, self.opts.target_grad)
        aux = {**aux, "sea": self.opts.weight * loss}
        return tokens, aux


@CONNECTORS.register("sea", options=SEAOptions, summary="SEA token-level alignment around any connector (training only)")
def build_sea(opts: dict, in_dim: int, out_dim: int, llm=None) -> SEAConnector:
    return SEAConnector(SEAOptions(**opts), in_dim, out_dim, llm=llm)
