"""MLP projector (LLaVA-1.5 ``mlp2x_gelu``): Linear(Dv, D) -> act -> Linear(D, D), depth configurable.

With ``pool`` > 1 the encoder's sequence is first average-pooled over windows of ``pool``
consecutive tokens (Qwen-Audio pools Whisper's frames by 2 this way; 4 or 8 suit a 1500-frame 30 s
window): ``N`` tokens give ``ceil(N / pool)``, the last window, when ``N`` is not a multiple of
``pool``, averaging only the tokens it holds (no padding enters the mean).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mmlm.connectors._base import Connector, ConnectorOptions
from mmlm.registry import CONNECTORS

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLPOptions(ConnectorOptions):
    # number of Linear layers: 2 is LLaVA-1.5's mlp2x_gelu, 1 LLaVA-1's single linear projection
    depth: int = Field(2, ge=1)
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"  # between the Linear layers (none when depth 1)
    hidden_dim: int | None = Field(None, gt=0)  # width between the Linear layers (depth > 1); default: the LLM width
    layernorm: bool = False  # InternVL-style LayerNorm on the input
    # average every `pool` consecutive encoder tokens before the MLP (1: none): N tokens give ceil(N / pool),
    # a shorter last window averaging the tokens it holds; for audio frames (Whisper: 1500 per 30 s, 4 or 8 is
    # typical); it pools along the sequence only, so on an image grid it pools along rows (pixel_shuffle: 2-D)
    pool: int = Field(1, ge=1)


def pool_tokens(feats: torch.Tensor, pool: int) -> torch.Tensor:
    """``[B, N, D]`` -> ``[B, ceil(N / pool), D]``: the mean of each window of ``pool`` consecutive
    tokens, the last one over the tokens it holds."""
    if pool == 1:
        return feats
    b, n, d = feats.shape
    m = -(-n // pool)
    pad = m * pool - n
    sums = nn.functional.pad(feats, (0, 0, 0, pad)).view(b, m, pool, d).sum(dim=2)
    counts = torch.full((m, 1), float(pool), dtype=feats.dtype, device=feats.device)
    counts[-1] = pool - pad
    return sums / counts


@CONNECTORS.register(
    "mlp", options=MLPOptions, summary="LLaVA MLP projector (depth, activation), optionally over pooled tokens (pool)"
)
class MLPConnector(Connector):
    def __init__(self, opts: MLPOptions, in_dim: int, out_dim: int, llm=None):
        super().__init__(in_dim, out_dim)
        self.pool = opts.pool
        hidden = opts.hidden_dim or out_dim
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if opts.layernorm else []
        dims = [in_dim] + [hidden] * (opts.depth - 1) + [out_dim]
        for i in range(opts.depth):
            if i > 0:
                layers.append(ACTIVATIONS[opts.activation]())
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        self.net = nn.Sequential(*layers)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return -(-num_input_tokens // self.pool)

    def forward(self, feats):
        return self.net(pool_tokens(feats, self.pool))
