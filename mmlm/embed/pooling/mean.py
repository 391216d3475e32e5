"""The mean of the real tokens' hidden states (ABC, LLaVE's alternative)."""

from __future__ import annotations

import torch

from mmlm.embed.pooling._base import Pooling, PoolingOptions
from mmlm.registry import POOLINGS


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@POOLINGS.register("mean", options=PoolingOptions, summary="the mean over real tokens (ABC)")
class MeanPooling(Pooling):
    def __init__(self, opts: PoolingOptions, width: int):
        super().__init__()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(hidden, mask)
