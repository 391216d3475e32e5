"""Q-Former (BLIP-2): K learned queries read the encoder features through a small transformer.

Each layer: self-attention among the queries, cross-attention from the queries to the encoder
features (on layers ``i`` with ``i % cross_attention_freq == 0``), feed-forward; pre-LayerNorm
residual blocks. Then ``Linear(hidden, out_dim)``. The output has ``num_queries`` tokens whatever
the number of encoder tokens, and since no position embedding is added to the encoder tokens the
output does not depend on their order. ``num_queries`` defaults by modality: 8 for audio (Video-LLaMA's
audio Q-Former), 32 for images and video (BLIP-2, Video-LLaMA's video Q-Former).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from mmlm.connectors._base import Connector
from mmlm.connectors._latent import FeedForward, LatentAttentionOptions
from mmlm.registry import CONNECTORS

QUERIES_BY_MODALITY = {"audio": 8}  # num_queries when not given: Video-LLaMA's audio Q-Former
DEFAULT_QUERIES = 32  # any other modality: BLIP-2, Video-LLaMA's video Q-Former


class QFormerOptions(LatentAttentionOptions):
    # K learned queries = tokens per image (clip, video) given to the LLM; null: by the modality the
    # connector serves, 8 for audio (Video-LLaMA's audio Q-Former), 32 otherwise (BLIP-2, Video-LLaMA's video)
    num_queries: int | None = Field(None, ge=1)
    num_layers: int = Field(2, ge=1)  # Q-Former layers (BLIP-2 uses 12, from BERT-base)
    # cross-attention to the features on every n-th layer, the first included: 2 in BLIP-2, 1 in Video-LLaMA
    cross_attention_freq: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout probability in the attention and feed-forward blocks
    query_init_std: float = Field(0.02, gt=0)  # std of the normal initialisation of the learned queries

    def for_modality(self, modality: str | None) -> QFormerOptions:
        if self.num_queries is not None:
            return self
        return self.model_copy(update={"num_queries": QUERIES_BY_MODALITY.get(modality, DEFAULT_QUERIES)})


class QFormerLayer(nn.Module):
    def __init__(self, hidden: int, kv_dim: int, heads: int, ffn_mult: float, dropout: float, cross: bool):
        super().__init__()
        self.norm_self = nn.LayerNorm(hidden)
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.cross = cross
        if cross:
            self.norm_cross = nn.LayerNorm(hidden)
            self.cross_attn = nn.MultiheadAttention(
                hidden, heads, dropout=dropout, kdim=kv_dim, vdim=kv_dim, batch_first=True
            )
        self.ff = FeedForward(hidden, ffn_mult, dropout)

    def forward(self, q: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        if self.cross:
            h = self.norm_cross(q)
            q = q + self.cross_attn(h, feats, feats, need_weights=False)[0]
        return q + self.ff(q)


@CONNECTORS.register("qformer", options=QFormerOptions, summary="BLIP-2 Q-Former: K learned queries, output length K")
class QFormerConnector(Connector):
    def __init__(self, opts: QFormerOptions, in_dim: int, out_dim: int, llm=None):
        super().__init__(in_dim, out_dim)
        hidden = opts.width(in_dim, "Q-Former")
        opts = opts.for_modality(None)  # resolved already by build_connector; else the default for images
        self.opts = opts
        self.queries = nn.Parameter(torch.randn(1, opts.num_queries, hidden) * opts.query_init_std)
        self.norm_feats = nn.LayerNorm(in_dim)  # BLIP-2's ln_vision; per token, so order-free
        self.layers = nn.ModuleList(
            QFormerLayer(
                hidden, in_dim, opts.heads, opts.ffn_mult, opts.dropout, cross=(i % opts.cross_attention_freq == 0)
            )
            for i in range(opts.num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, out_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.opts.num_queries

    def forward(self, feats):
        feats = self.norm_feats(feats)
        q = self.queries.expand(feats.shape[0], -1, -1).to(feats.dtype)
        for layer in self.layers:
            q = layer(q, feats)
        return self.proj(self.norm_out(q))
