"""The connector contract.

``build(component, in_dim, out_dim, llm=None)`` makes a connector from its YAML entry. A connector's
``forward(feats, context=None)`` turns encoder features ``[B, N, in_dim]`` (or a list of layers) into
LLM input embeddings ``[B, M, out_dim]``; it may return ``(tokens, {"name": aux_loss})`` instead of
the tensor alone. ``num_output_tokens(N)`` gives M before any forward so the processor can expand the
``<image>`` placeholder to exactly that many ids. ``context`` carries what the batch knows beyond the
pixels (per-patch labels, the stage's options); connectors that need none ignore it.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ConnectorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # optional declared widths; when given they must match what the encoder and LLM provide
    in_dim: int | None = Field(None, gt=0)
    out_dim: int | None = Field(None, gt=0)


class Connector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, feats, context: dict[str, Any] | None = None):  # pragma: no cover - abstract
        raise NotImplementedError


def split_output(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Normalise a connector's return value to ``(tokens, aux_losses)``."""
    if isinstance(out, tuple):
        tokens, aux = out
        return tokens, dict(aux or {})
    return out, {}


def build(component, in_dim: int, out_dim: int, llm: nn.Module | None = None, where: str = "model.connectors") -> Connector:
    """Build a connector from its config entry (``type`` plus options)."""
    from mmlm.registry import CONNECTORS

    entry = CONNECTORS.get(component.type, where=f"{where}.type")
    opts = component.options()
    if entry.options is not None:
        opts = entry.options.model_validate(opts).model_dump(mode="python")
    for key, actual, what in (("in_dim", in_dim, "the encoder produces"), ("out_dim", out_dim, "the LLM's hidden size is")):
        declared = opts.get(key)
        if declared is not None and declared != actual:
            raise ValueError(
                f"{where}.{key} is {declared} but {what} {actual}: dimension mismatch between "
                f"{'encoder and connector' if key == 'in_dim' else 'connector and LLM'}"
            )
    return entry.builder(opts, in_dim=in_dim, out_dim=out_dim, llm=llm)
