"""NV-Embed's latent attention: each token's hidden state (the query) attends over ``num_latents``
learned latent vectors (keys = values), an MLP follows with a residual, then the masked mean."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from mmlm.embed.pooling._base import Pooling, PoolingOptions
from mmlm.embed.pooling.mean import masked_mean
from mmlm.registry import POOLINGS


class LatentAttentionOptions(PoolingOptions):
    num_latents: int = Field(512, gt=0)  # learned latent vectors the tokens attend over (NV-Embed: 512)
    heads: int = Field(8, gt=0)  # attention heads; must divide the LLM's width
    mlp_ratio: int = Field(4, gt=0)  # the MLP's hidden width as a multiple of the LLM's width


@POOLINGS.register(
    "latent_attention",
    options=LatentAttentionOptions,
    summary="NV-Embed latent attention: tokens attend to learned latents, MLP, masked mean",
    example={"num_latents": 4, "heads": 2},
)
class LatentAttention(Pooling):
    def __init__(self, opts: LatentAttentionOptions, width: int):
        super().__init__()
        if width % opts.heads:
            raise ValueError(f"heads={opts.heads} does not divide the LLM's width {width}")
        self.latents = nn.Parameter(torch.randn(opts.num_latents, width) * width**-0.5)
        self.attn = nn.MultiheadAttention(width, opts.heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(width, opts.mlp_ratio * width), nn.GELU(), nn.Linear(opts.mlp_ratio * width, width)
        )

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kv = self.latents.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        out, _ = self.attn(hidden, kv, kv, need_weights=False)
        out = out + self.mlp(out)
        return masked_mean(out, mask)
