"""``fastv``: drop the visual tokens the prompt's last token attends to least, at one layer of the
LLM (FastV, Chen et al., 2024: K = 2, half dropped), for that layer and every one after it."""

from __future__ import annotations

import torch
from pydantic import Field

from mmlm.reduce._base import Reducer, ReducerOptions
from mmlm.registry import REDUCERS


class FastVOptions(ReducerOptions):
    layer: int = Field(2, ge=0)  # K: the first layer that reads only the kept tokens


@REDUCERS.register(
    "fastv",
    options=FastVOptions,
    summary="FastV: at layer K, drop the visual tokens the last token attends to least",
    example={"keep": 0.5, "layer": 1},
)
class FastV(Reducer):
    @property
    def prunes(self) -> bool:
        return True

    def keep_schedule(self, num_layers: int) -> dict[int, float]:
        if self.opts.layer >= num_layers:
            raise ValueError(
                f"model.token_reduction.*.layer: fastv prunes at layer {self.opts.layer}, but the LLM has "
                f"{num_layers} layers (0 to {num_layers - 1})"
            )
        return {} if self.opts.keep >= 1 else {self.opts.layer: self.opts.keep}

    def scores(self, attn: torch.Tensor, text: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return attn[torch.arange(attn.shape[0], device=attn.device), last]  # the last token's row
