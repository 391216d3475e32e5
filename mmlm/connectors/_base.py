"""The connector contract.

``build(component, in_dim, out_dim, llm=None)`` makes a connector from its YAML entry. A connector's
``forward(feats, context=None)`` turns encoder features ``[B, N, in_dim]`` (or a list of layers) into
LLM input embeddings ``[B, M, out_dim]``; it may return ``(tokens, {"name": aux_loss})`` instead of
the tensor alone. ``num_output_tokens(N)`` gives M before any forward so the processor can expand the
``<image>`` placeholder to exactly that many ids. ``context`` carries what the batch knows beyond the
pixels (per-patch labels, the stage's options); connectors that need none ignore it.
"""

from __future__ import annotations

import abc

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ConnectorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # optional declared widths; when given they must match what the encoder and LLM provide
    in_dim: int | None = Field(None, gt=0)
    out_dim: int | None = Field(None, gt=0)
    # how to merge several encoder layers (``select_layers`` with more than one entry) before the
    # connector: see ``mmlm/connectors/_fusion.py``; ignored when the encoder gives one layer
    fusion: Literal["concat", "scalar_mix", "gated_xattn"] | None = None


class Connector(nn.Module, abc.ABC):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    @abc.abstractmethod
    def forward(self, feats, context: dict[str, Any] | None = None):
        """``[B, N, in_dim]`` (or a list of layers) -> ``[B, M, out_dim]`` or ``(tokens, aux_losses)``."""


def split_output(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Normalise a connector's return value to ``(tokens, aux_losses)``."""
    if isinstance(out, tuple):
        tokens, aux = out
        return tokens, dict(aux or {})
    return out, {}


def build(component, in_dim: int, out_dim: int, llm: nn.Module | None = None, where: str = "model.connectors",
          layer_dims: list[int] | None = None) -> Connector:
    """Build a connector from its config entry (``type`` plus options).

    ``layer_dims`` gives the width of each encoder layer when the encoder returns several (its
    ``select_layers`` order, deep layer first); the connector's ``fusion`` option then picks how they
    are merged, and the result is a connector that fuses and then applies the configured one."""
    from mmlm.registry import CONNECTORS

    entry = CONNECTORS.get(component.type, where=f"{where}.type")
    opts = component.options()
    if entry.options is not None:
        opts = entry.options.model_validate(opts).model_dump(mode="python")
    multi = layer_dims is not None and len(layer_dims) > 1
    fusion = None
    if multi:
        from mmlm.connectors import _fusion

        kind = opts.get("fusion")
        if kind is None:
            from mmlm.config import ConfigError

            raise ConfigError(
                f"the encoder returns {len(layer_dims)} layers (select_layers) but no fusion is set; "
                f"valid choices: {', '.join(_fusion.FUSIONS)}",
                f"{where}.fusion",
            )
        fusion = _fusion.build_fusion(kind, list(layer_dims), where=f"{where}.fusion")
        in_dim = fusion.out_dim
    for key, actual, what in (
        ("in_dim", in_dim, "the fused encoder layers give" if multi else "the encoder produces"),
        ("out_dim", out_dim, "the LLM's hidden size is"),
    ):
        declared = opts.get(key)
        if declared is not None and declared != actual:
            raise ValueError(
                f"{where}.{key} is {declared} but {what} {actual}: dimension mismatch between "
                f"{'encoder and connector' if key == 'in_dim' else 'connector and LLM'}"
            )
    inner = entry.builder(opts, in_dim=in_dim, out_dim=out_dim, llm=llm)
    if fusion is None:
        return inner
    return FusedConnector(fusion, inner)


class FusedConnector(Connector):
    """Merge the encoder's layers with ``fusion``, then apply the configured connector ``inner``."""

    def __init__(self, fusion: nn.Module, inner: Connector):
        super().__init__(inner.in_dim, inner.out_dim)
        self.fusion = fusion
        self.inner = inner

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.inner.num_output_tokens(num_input_tokens)

    def forward(self, feats, context: dict[str, Any] | None = None):
        if not isinstance(feats, (list, tuple)):
            raise ValueError(
                f"this connector fuses {self.fusion.num_layers} encoder layers but got a single tensor; "
                "the encoder's select_layers must list that many layers"
            )
        return self.inner(self.fusion(list(feats)), context=context)
