"""``tome``: Token Merging (Bolya et al., 2023) between the connector and the LLM.

One step splits the tokens alternately into sets A (even positions) and B (odd), scores each A
token's best match in B by the cosine similarity of the tokens themselves, and averages the r
best-matched A tokens into their B partners, weighted by how many original tokens each already
stands for: N -> N - r. Steps repeat until the kept fraction is reached (``keep``), or run a fixed
``r`` per step ``steps`` times. The survivors keep their original order, so the LLM reads them
in the image's raster order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from mmlm.reduce._base import Reducer, ReducerOptions, keep_count
from mmlm.registry import REDUCERS


class ToMeOptions(ReducerOptions):
    # the fraction of tokens kept (steps of at most N/2 each until it is reached); default 0.5
    keep: float | None = Field(None, gt=0, le=1)
    r: int | None = Field(None, ge=0)  # instead of keep: tokens merged per step
    steps: int = Field(1, ge=1)  # with r: how many merging steps

    @model_validator(mode="after")
    def _one_target(self):
        if self.r is not None and self.keep is not None:
            raise ValueError("give keep (a fraction) or r (tokens per step), not both")
        if self.r is None and self.steps != 1:
            raise ValueError("steps counts merging steps of r tokens: set r with it, or use keep alone")
        if self.r is None and self.keep is None:
            self.keep = 0.5
        return self


def merge_schedule(n: int, keep: float | None, r: int | None, steps: int) -> list[int]:
    """Tokens merged at each step, from ``n`` tokens (each step merges at most half of them)."""
    out = []
    if r is not None:
        for _ in range(steps):
            k = min(r, n // 2)
            out.append(k)
            n -= k
        return out
    target = keep_count(n, keep)
    while n > target:
        k = min(n // 2, n - target)
        if k <= 0:
            break
        out.append(k)
        n -= k
    return out


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ToMe step on ``x [B, N, D]`` with ``size [B, N, 1]`` (original tokens per token):
    ``[B, N - r, D]`` and its sizes, in the original order."""
    B, N, D = x.shape
    r = min(r, N // 2)
    if r <= 0:
        return x, size
    metric = F.normalize(x.float(), dim=-1)
    a, b = metric[:, 0::2], metric[:, 1::2]
    best, partner = (a @ b.transpose(1, 2)).max(dim=-1)  # [B, Na]: each A token's best B token
    order = best.argsort(dim=-1, descending=True, stable=True)
    src, unm = order[:, :r], order[:, r:].sort(dim=-1).values
    dst = partner.gather(1, src)
    xa, xb, sa, sb = x[:, 0::2], x[:, 1::2], size[:, 0::2], size[:, 1::2]
    take = lambda t, i: t.gather(1, i.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    sizes_b = sb.scatter_add(1, dst.unsqueeze(-1), take(sa, src))
    sums_b = (xb * sb).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, D), take(xa * sa, src))
    merged_b = (sums_b / sizes_b).to(x.dtype)
    # back to raster order: A token i sat at 2i, B token j at 2j + 1
    pos = torch.cat([2 * unm, 2 * torch.arange(xb.shape[1], device=x.device).expand(B, -1) + 1], dim=1)
    perm = pos.argsort(dim=1)
    out = take(torch.cat([take(xa, unm), merged_b], dim=1), perm)
    out_size = take(torch.cat([take(sa, unm), sizes_b], dim=1), perm)
    return out, out_size


@REDUCERS.register(
    "tome",
    options=ToMeOptions,
    summary="ToMe: merge similar tokens pairwise (bipartite soft matching) before the LLM",
    example={"keep": 0.5},
)
class ToMe(Reducer):
    def _schedule(self, n: int) -> list[int]:
        return merge_schedule(n, self.opts.keep, self.opts.r, self.opts.steps)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens - sum(self._schedule(num_input_tokens))

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        size = torch.ones(*tokens.shape[:2], 1, dtype=torch.float32, device=tokens.device)
        for r in self._schedule(tokens.shape[1]):
            tokens, size = bipartite_merge(tokens, size, r)
        return tokens
