"""The hidden state of the last real token (VLM2Vec, E5-V, GME, LLaVE, UniME)."""

from __future__ import annotations

import torch

from mmlm.embed.pooling._base import Pooling, PoolingOptions, last_positions
from mmlm.registry import POOLINGS


@POOLINGS.register("last", options=PoolingOptions, summary="the last real token's hidden state (VLM2Vec, E5-V, GME)")
class LastToken(Pooling):
    def __init__(self, opts: PoolingOptions, width: int):
        super().__init__()

    def reads(self, mask: torch.Tensor) -> torch.Tensor:
        return last_positions(mask)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_positions(mask)]
