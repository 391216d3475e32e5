"""The connector contract.

A connector is a class registered in ``mmlm.registry.CONNECTORS`` with its options model and built
with ``(options, in_dim, out_dim, llm)``. It has exactly two methods the rest of mmlm calls:

- ``forward(feats) -> tokens``: encoder features ``[B, N, in_dim]`` -> LLM input embeddings
  ``[B, M, out_dim]``. Pure: no LLM call, no stage, no labels, no loss. Training-time losses on the
  tokens (SEA) are objectives (``mmlm/objectives/``) that read the tokens from the model's output.
- ``num_output_tokens(N) -> M``, known before any forward, so the processor expands each media
  placeholder to exactly M ids.

What a connector needs of the LLM (AlignVLM's embedding matrix, Ovis's embedding statistics) it
takes at build time from ``llm``; a tensor it uses by reference is held outside the module tree
(``LLMRef``) so it is never part of the connector's state dict or of a checkpoint twice.

An option whose default depends on the modality the connector serves (the Q-Former's ``num_queries``:
8 for audio, 32 otherwise) defaults to ``None`` in its options model and is filled in by the options'
``for_modality`` when ``build_connector`` is told the modality (the key under ``model.connectors``),
so the connector itself receives plain, complete options and never learns its modality.
"""

from __future__ import annotations

import abc
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mmlm.connectors._fusion import FUSIONS, build_fusion
from mmlm.errors import ConfigError
from mmlm.registry import CONNECTORS


class ConnectorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # the width of the encoder features the connector reads (the fused width with ``fusion``); when given
    # it is only checked against it (a config error on mismatch), null: taken from the encoder
    in_dim: int | None = Field(None, gt=0)
    # the width of the tokens the connector outputs, which is always the LLM's hidden size; when given it
    # is only checked against it (a config error on mismatch), null: taken from the LLM
    out_dim: int | None = Field(None, gt=0)
    # how to merge several encoder layers (``select_layers`` with more than one entry) before the
    # connector: see ``mmlm/connectors/_fusion.py``; refused when the encoder gives one layer
    fusion: Literal["concat", "scalar_mix", "gated_xattn"] | None = None

    def for_modality(self, modality: str | None) -> ConnectorOptions:
        """These options with every default that depends on the modality the connector serves
        filled in (``modality`` None: the defaults for images); an option given in the YAML is
        kept as written. The base has no such default."""
        return self


class Connector(nn.Module, abc.ABC):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    @abc.abstractmethod
    def forward(self, feats) -> torch.Tensor:
        """``[B, N, in_dim]`` (a list of layers for a fused connector) -> ``[B, M, out_dim]``."""


class LLMRef:
    """Holds the LLM outside ``nn.Module``'s registration (not a submodule, not in ``state_dict``);
    ``copy.deepcopy`` shares it rather than copying the whole LLM."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


def build_connector(
    component,
    in_dim: int,
    out_dim: int,
    llm: nn.Module | None = None,
    where: str = "model.connectors",
    layer_dims: list[int] | None = None,
    modality: str | None = None,
) -> Connector:
    """Build a connector from its config entry (``type`` plus options).

    ``modality`` is the modality the connector serves (image, audio, video): the options'
    ``for_modality`` fills in the defaults that depend on it (None: those for images).

    ``layer_dims`` gives the width of each encoder layer when the encoder returns several (its
    ``select_layers`` order, deep layer first); the connector's ``fusion`` option then picks how they
    are merged, and the result is a connector that fuses and then applies the configured one."""
    opts = component.parsed(CONNECTORS, where)
    multi = layer_dims is not None and len(layer_dims) > 1
    fusion = None
    if multi:
        if opts.fusion is None:
            raise ConfigError(
                f"the encoder returns {len(layer_dims)} layers (select_layers) but no fusion is set; "
                f"valid choices: {', '.join(FUSIONS)}",
                f"{where}.fusion",
            )
        fusion = build_fusion(opts.fusion, list(layer_dims), where=f"{where}.fusion")
        in_dim = fusion.out_dim
    elif opts.fusion is not None:
        raise ConfigError(
            f"fusion {opts.fusion!r} merges several encoder layers but the encoder gives one; "
            "list several in the encoder's select_layers or drop fusion",
            f"{where}.fusion",
        )
    for key, actual, what in (
        ("in_dim", in_dim, "the fused encoder layers give" if multi else "the encoder produces"),
        ("out_dim", out_dim, "the LLM's hidden size is"),
    ):
        declared = getattr(opts, key)
        if declared is not None and declared != actual:
            raise ConfigError(
                f"{declared} but {what} {actual}: dimension mismatch between "
                f"{'encoder and connector' if key == 'in_dim' else 'connector and LLM'}",
                f"{where}.{key}",
            )
    entry = CONNECTORS.get(component.name, where=f"{where}.{component.name_key}")
    inner = entry.target(opts.for_modality(modality), in_dim, out_dim, llm)
    return inner if fusion is None else FusedConnector(fusion, inner)


class FusedConnector(Connector):
    """Merge the encoder's layers with ``fusion``, then apply the configured connector ``inner``."""

    def __init__(self, fusion: nn.Module, inner: Connector):
        super().__init__(inner.in_dim, inner.out_dim)
        self.fusion = fusion
        self.inner = inner

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.inner.num_output_tokens(num_input_tokens)

    def forward(self, feats) -> torch.Tensor:
        if not isinstance(feats, (list, tuple)):
            raise ValueError(
                f"this connector fuses {self.fusion.num_layers} encoder layers but got a single tensor; "
                "the encoder's select_layers must list that many layers"
            )
        return self.inner(self.fusion(list(feats)))
