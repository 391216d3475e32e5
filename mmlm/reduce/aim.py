"""``aim``: AIM (Zhong et al., 2024), training-free: merge similar tokens before the LLM (ToMe's
bipartite matching down to ``keep``), then prune inside it, the kept fraction of the visual tokens
falling linearly over the second half of the layers (from ``start``) to ``end_keep`` at the last.

A visual token's importance at a pruning layer is a PageRank over that layer's attention: rank
flows from the text tokens along attention (``s <- (1 - d) s0 + d A^T s``, ``s0`` uniform over the
text), so a visual token matters when text attends to it, directly or through other tokens.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from mmlm.reduce._base import ReducerOptions
from mmlm.reduce.tome import ToMe, merge_schedule
from mmlm.registry import REDUCERS


class AIMOptions(ReducerOptions):
    keep: float = Field(0.5, gt=0, le=1)  # the fraction kept by merging before the LLM
    start: float = Field(0.5, ge=0, le=1)  # pruning starts at this fraction of the LLM's depth
    end_keep: float = Field(0.0, ge=0, le=1)  # the fraction of the merged tokens the last layer reads
    damping: float = Field(0.85, gt=0, lt=1)  # PageRank's damping factor
    iterations: int = Field(3, ge=1)  # PageRank steps

    @model_validator(mode="after")
    def _fractions(self):
        if self.start >= 1 and self.end_keep < 1:
            raise ValueError("start 1 leaves no layer to prune: lower start, or set end_keep 1 to switch pruning off")
        return self


@REDUCERS.register(
    "aim",
    options=AIMOptions,
    summary="AIM: ToMe merging before the LLM, then pruning falling linearly over its second half",
    example={"keep": 0.5},
)
class AIM(ToMe):
    """ToMe's merging (``num_output_tokens``, ``merge``) down to ``keep``, plus pruning."""

    def _schedule(self, n: int) -> list[int]:
        return merge_schedule(n, self.opts.keep, None, 1)

    @property
    def prunes(self) -> bool:
        return self.opts.end_keep < 1

    def keep_schedule(self, num_layers: int) -> dict[int, float]:
        """Layers from ``int(start * L)`` on: the fraction falls linearly from 1 (the layer before
        the first pruned one) to ``end_keep`` at the last layer."""
        if not self.prunes:
            return {}
        first = min(int(self.opts.start * num_layers), num_layers - 1)
        span = num_layers - first  # layers pruned
        out = {}
        for i, layer in enumerate(range(first, num_layers)):
            out[layer] = 1 - (i + 1) / span * (1 - self.opts.end_keep)
        return out

    def scores(self, attn: torch.Tensor, text: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        s0 = text.float() / text.float().sum(dim=1, keepdim=True).clamp(min=1)
        s = s0
        d = self.opts.damping
        for _ in range(self.opts.iterations):
            s = (1 - d) * s0 + d * torch.einsum("bqk,bq->bk", attn.float(), s)
        return s
