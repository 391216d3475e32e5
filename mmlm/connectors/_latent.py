"""Pieces shared by the connectors that read encoder features with a fixed set of learned
queries/latents (Q-Former, perceiver resampler): width options and the feed-forward block."""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from mmlm.connectors._base import ConnectorOptions


class LatentAttentionOptions(ConnectorOptions):
    hidden: int | None = Field(None, gt=0)  # width of the queries/latents and of attention; default: encoder width
    heads: int = Field(8, ge=1)  # attention heads of every attention layer; must divide the width (hidden)
    # feed-forward inner width as a multiple of the attention width (4 in BLIP-2 and Flamingo)
    ffn_mult: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden is not None and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self

    def width(self, in_dim: int, what: str) -> int:
        """The attention width: ``hidden``, or the encoder width; must split into ``heads``."""
        hidden = self.hidden or in_dim
        if hidden % self.heads:
            raise ValueError(
                f"model.connectors.*.heads: the {what} width {hidden} (hidden, default the encoder width) "
                f"is not divisible by heads={self.heads}"
            )
        return hidden


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: float, dropout: float = 0.0):
        inner = max(1, int(dim * mult))
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, dim)
        )
