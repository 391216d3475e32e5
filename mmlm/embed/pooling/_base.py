"""The pooling contract: ``forward(hidden [B, T, D], mask [B, T]) -> [B, D]``, the same whatever side
the batch was padded on; built with ``(options, width)``. A pooling with parameters (latent
attention) is part of the model (``pooler.*``) and trains and saves with it."""

from __future__ import annotations

import abc

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from mmlm.registry import POOLINGS


class PoolingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Pooling(nn.Module, abc.ABC):
    def reads(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The one position of each row whose final hidden state ``forward`` reads (``[B]``), or
        None when it reads several; the model then computes the last layer's MLP there only."""
        return None

    @abc.abstractmethod
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per row of ``hidden`` from its real (``mask == 1``) positions."""


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding alike."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values


def build_pooling(component, width: int, where: str = "model.embedding.pooling") -> Pooling:
    return POOLINGS.create(component, width, where=where)
