"""The reducer contract: fewer media tokens for the LLM to read.

A reducer is a class registered in ``mmlm.registry.REDUCERS`` with its options model, configured
per modality as ``model.token_reduction.image: {type: tome, keep: 0.5}`` and built with
``(options)``. It may do either or both of two things:

- **merge** before the LLM: ``merge(tokens [items, M, D]) -> [items, M', D]`` with
  ``num_output_tokens(M) -> M'`` known before any forward, so the processor expands each
  placeholder to exactly M' ids (``tome``, ``visionzip``, the merging half of ``aim``);
- **prune** inside the LLM: ``keep_schedule(num_layers) -> {layer: fraction}`` names the layers
  where the modality's tokens are cut and the fraction of them (of those that entered the LLM)
  kept from that layer on; ``scores(attn, ...)`` ranks them from one explicit attention at that
  layer. ``mmlm/reduce/_prune.py`` runs the schedule: it gathers the kept hidden states with
  their position ids, so every other layer keeps its own attention backend (``fastv``, ``aim``).

Text tokens are never merged or dropped. Reducers with no parameters keep nothing in a
checkpoint, so ``--set model.token_reduction.image.keep=0.25`` switches one at evaluation time.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mmlm.registry import REDUCERS


class ReducerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # the fraction of the modality's tokens kept (1: none removed)
    keep: float = Field(0.5, gt=0, le=1)


class Reducer(nn.Module):
    """Identity by default: a subclass overrides what it does (merging, pruning or both)."""

    def __init__(self, opts: ReducerOptions):
        super().__init__()
        self.opts = opts

    # ---- merging before the LLM
    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[items, M, D]`` -> ``[items, num_output_tokens(M), D]``."""
        return tokens

    # ---- pruning inside the LLM
    @property
    def prunes(self) -> bool:
        return False

    def keep_schedule(self, num_layers: int) -> dict[int, float]:
        """Layer index -> the fraction of the modality's tokens (as they entered the LLM) that
        layer and the ones after it read; empty: no pruning."""
        return {}

    def scores(self, attn: torch.Tensor, text: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Importance of every position ``[B, S]`` from the attention probabilities at a pruning
        layer, ``attn [B, S, S]`` (heads averaged; ``text [B, S]`` marks the valid text
        positions, ``last [B]`` the index of each row's last position)."""
        raise TypeError(f"{type(self).__name__} does not prune")


def keep_count(n: int, fraction: float) -> int:
    """How many of ``n`` tokens a kept ``fraction`` keeps: rounded, at least one of a non-empty set
    while the fraction is positive."""
    if fraction >= 1 or n == 0:
        return n
    if fraction <= 0:
        return 0
    return max(1, min(n, int(round(n * fraction))))


def build_reducer(component, where: str) -> Reducer:
    return REDUCERS.create(component, where=where)
