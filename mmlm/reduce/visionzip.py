"""``visionzip``: keep the dominant tokens and merge the rest into a few context tokens
(VisionZip, Yang et al., 2024), between the connector and the LLM.

Dominant tokens are those the image's mean query attends to most: ``softmax(x q / sqrt(D))`` with
``q`` the mean token, computed on the tokens the connector gives, so it works for any encoder and
connector (VisionZip itself reads the CLS attention of a CLIP tower, which a ConvNet or a
SigLIP tower does not have). Of the rest, evenly spaced ones become context targets; every other
remaining token joins the target it is most similar to (cosine), and each target becomes the mean
of its group. Output: the dominant tokens in raster order, then the context tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from mmlm.reduce._base import Reducer, ReducerOptions, keep_count
from mmlm.registry import REDUCERS


class VisionZipOptions(ReducerOptions):
    # the share of the kept tokens that are merged context tokens (VisionZip: 10 of 64)
    context: float = Field(0.15, ge=0, lt=1)


def counts(n: int, keep: float, context: float) -> tuple[int, int]:
    """(dominant, context) token counts for ``n`` tokens."""
    m = keep_count(n, keep)
    if m >= n:
        return n, 0
    if context <= 0 or m < 2:
        return m, 0
    c = min(m - 1, max(1, int(round(m * context))))
    return m - c, c


@REDUCERS.register(
    "visionzip",
    options=VisionZipOptions,
    summary="VisionZip: dominant tokens by attention plus a few merged context tokens, before the LLM",
    example={"keep": 0.5},
)
class VisionZip(Reducer):
    def num_output_tokens(self, num_input_tokens: int) -> int:
        return sum(counts(num_input_tokens, self.opts.keep, self.opts.context))

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        n_dom, n_ctx = counts(N, self.opts.keep, self.opts.context)
        if n_dom + n_ctx >= N:
            return tokens
        x = tokens.float()
        attn = (x @ x.mean(dim=1, keepdim=True).transpose(1, 2)).squeeze(-1) / D**0.5  # [B, N]
        attn = attn.softmax(dim=-1)
        order = attn.argsort(dim=-1, descending=True, stable=True)
        dom = order[:, :n_dom].sort(dim=-1).values
        rest = order[:, n_dom:].sort(dim=-1).values  # [B, R] in raster order
        take = lambda t, i: t.gather(1, i.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
        out = [take(tokens, dom)]
        if n_ctx:
            R = rest.shape[1]
            tgt_at = torch.linspace(0, R - 1, n_ctx, device=tokens.device).round().long()  # evenly spaced
            rest_x = take(x, rest)  # [B, R, D]
            sim = F.normalize(rest_x, dim=-1) @ F.normalize(rest_x[:, tgt_at], dim=-1).transpose(1, 2)  # [B, R, C]
            group = sim.argmax(dim=-1)
            group[:, tgt_at] = torch.arange(n_ctx, device=tokens.device)  # a target is in its own group
            sums = torch.zeros(B, n_ctx, D, device=x.device).scatter_add(
                1, group.unsqueeze(-1).expand(-1, -1, D), rest_x
            )
            sizes = torch.zeros(B, n_ctx, 1, device=x.device).scatter_add(
                1, group.unsqueeze(-1), torch.ones(B, R, 1, device=x.device)
            )
            out.append((sums / sizes).to(tokens.dtype))
        return torch.cat(out, dim=1)
