"""Pixel shuffle (InternVL, nanoVLM, Idefics3): fold each s x s block of the patch grid into one token.

The fold is a pure permutation of the features: ``[B, H*W, C] -> [B, (H/s)*(W/s), s*s*C]``, each
output token holding its block's patches in row-major order (``unfold`` inverts it exactly). Then
InternVL's MLP: ``LayerNorm -> Linear -> GELU -> Linear``. The encoder's tokens must form a square
grid whose side is divisible by s; anything else fails at build time, from ``num_output_tokens``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from mmlm.connectors._base import Connector, ConnectorOptions
from mmlm.registry import CONNECTORS


class PixelShuffleOptions(ConnectorOptions):
    scale: int = Field(2, ge=1)  # s: each s x s block becomes one token, s*s fewer tokens (InternVL: 2)
    hidden_dim: int | None = Field(None, gt=0)  # width of the MLP's middle layer; default: the LLM width


def grid_side(num_tokens: int, scale: int) -> int:
    """Side of the square patch grid of ``num_tokens`` tokens; raises unless it is divisible by ``scale``."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"pixel_shuffle: the encoder gives {num_tokens} tokens, which is not a square patch grid; "
            f"pixel_shuffle (scale {scale}) needs a square grid whose side is divisible by {scale}"
        )
    if side % scale:
        raise ValueError(
            f"pixel_shuffle: the {side}x{side} patch grid ({num_tokens} tokens) is not divisible by scale {scale}; "
            f"choose a scale that divides {side}, or an encoder image size / patch size giving a grid "
            f"divisible by {scale}"
        )
    return side


def fold(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``[B, H*W, C] -> [B, (H/s)*(W/s), s*s*C]``: a pure permutation of the entries."""
    B, N, C = x.shape
    side = grid_side(N, scale)
    g = side // scale
    x = x.reshape(B, g, scale, g, scale, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, g * g, scale * scale * C)


def unfold(y: torch.Tensor, scale: int) -> torch.Tensor:
    """Inverse of ``fold``: ``[B, (H/s)*(W/s), s*s*C] -> [B, H*W, C]``."""
    B, M, D = y.shape
    g = math.isqrt(M)
    if g * g != M or D % (scale * scale):
        raise ValueError(f"unfold: {M} tokens of width {D} are not a folded square grid at scale {scale}")
    C = D // (scale * scale)
    y = y.reshape(B, g, g, scale, scale, C).permute(0, 1, 3, 2, 4, 5)
    return y.reshape(B, g * scale * g * scale, C)


@CONNECTORS.register(
    "pixel_shuffle", options=PixelShuffleOptions, summary="fold s x s patch blocks into one token, then an MLP"
)
class PixelShuffleConnector(Connector):
    def __init__(self, opts: PixelShuffleOptions, in_dim: int, out_dim: int, llm=None):
        super().__init__(in_dim, out_dim)
        self.scale = opts.scale
        width = in_dim * opts.scale**2
        hidden = opts.hidden_dim or out_dim
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def num_output_tokens(self, num_input_tokens: int) -> int:
        side = grid_side(num_input_tokens, self.scale)
        return (side // self.scale) ** 2

    def forward(self, feats):
        return self.mlp(fold(feats, self.scale))
