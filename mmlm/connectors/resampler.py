"""Perceiver resampler (Flamingo): learned latents attend to ``[features; latents]``.

Each of ``depth`` layers: ``latents += Attn(q=LN(latents), kv=[LN(features); LN(latents)])``, then
``latents += FF(latents)``; a final LayerNorm and ``Linear(hidden, out_dim)``. The output has
``num_latents`` tokens whatever the number of encoder tokens.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from mmlm.connectors._base import Connector
from mmlm.connectors._latent import FeedForward, LatentAttentionOptions
from mmlm.registry import CONNECTORS


class ResamplerOptions(LatentAttentionOptions):
    # learned latents = tokens per image given to the LLM (64 in Flamingo); they have width ``hidden``
    # (default the encoder width) and the features are projected to it when it differs
    num_latents: int = Field(64, ge=1)
    depth: int = Field(2, ge=1)  # perceiver layers (Flamingo uses 6)
    latent_init_std: float = Field(0.02, gt=0)  # std of the normal initialisation of the learned latents


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_mult: float):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = FeedForward(dim, ffn_mult)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        lat = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(x), lat], dim=1)
        latents = latents + self.attn(lat, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


@CONNECTORS.register(
    "resampler", options=ResamplerOptions, summary="Flamingo perceiver resampler: latents attend to [feats; latents]"
)
class ResamplerConnector(Connector):
    def __init__(self, opts: ResamplerOptions, in_dim: int, out_dim: int, llm=None):
        super().__init__(in_dim, out_dim)
        hidden = opts.width(in_dim, "resampler")
        self.opts = opts
        self.proj_in = nn.Linear(in_dim, hidden) if hidden != in_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(1, opts.num_latents, hidden) * opts.latent_init_std)
        self.layers = nn.ModuleList(PerceiverLayer(hidden, opts.heads, opts.ffn_mult) for _ in range(opts.depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, out_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.opts.num_latents

    def forward(self, feats):
        x = self.proj_in(feats)
        lat = self.latents.expand(x.shape[0], -1, -1).to(x.dtype)
        for layer in self.layers:
            lat = layer(x, lat)
        return self.proj(self.norm_out(lat))
