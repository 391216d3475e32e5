"""Multi-layer fusion: merge several encoder layers into one feature sequence before a connector.

The encoder returns its layers in ``select_layers`` order; the first is the "deep" one (list the
deepest first, e.g. ``[-2, -5, -8]``). Three ways to merge them:

- ``concat``: concatenate along channels (HF Llava's ``vision_feature_layer`` list, prismatic's
  fused backbones); width = sum of the layer widths; every layer must have the same token count.
- ``scalar_mix``: ``gamma * sum_l softmax(w)_l h_l`` (ELMo, BERMo); equal widths required.
- ``gated_xattn``: MMFuser-style; the deep features query the other layers by cross-attention and
  the result is added through a zero-initialised tanh gate, so at initialisation the output is the
  deep features exactly. Width = the deep layer's width; the other layers may differ in width
  and token count.

This module starts with an underscore so the connector registry does not scan it.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlm.errors import ConfigError

FUSIONS = ("concat", "scalar_mix", "gated_xattn")


def _heads_for(dim: int) -> int:
    for h in (8, 4, 2, 1):
        if dim % h == 0 and dim // h >= 8:
            return h
    return 1


class Fusion(nn.Module):
    def __init__(self, layer_dims: list[int]):
        super().__init__()
        self.layer_dims = list(layer_dims)
        self.num_layers = len(layer_dims)

    def _check(self, layers: list[torch.Tensor], same_tokens: bool) -> None:
        if len(layers) != self.num_layers:
            raise ValueError(f"{type(self).__name__}: expected {self.num_layers} encoder layers, got {len(layers)}")
        dims = [int(x.shape[-1]) for x in layers]
        if dims != self.layer_dims:
            raise ValueError(
                f"{type(self).__name__}: encoder layer widths {dims} differ from the widths it was built for "
                f"{self.layer_dims}"
            )
        if same_tokens:
            ns = [int(x.shape[1]) for x in layers]
            if len(set(ns)) > 1:
                raise ValueError(
                    f"{type(self).__name__}: every fused layer must have the same number of tokens, "
                    f"but the encoder layers have {ns} tokens; use fusion: gated_xattn for layers of different lengths"
                )


class ConcatFusion(Fusion):
    def __init__(self, layer_dims: list[int]):
        super().__init__(layer_dims)
        self.out_dim = sum(layer_dims)

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        self._check(layers, same_tokens=True)
        return torch.cat(layers, dim=-1)


class ScalarMix(Fusion):
    def __init__(self, layer_dims: list[int], where: str = "fusion"):
        super().__init__(layer_dims)
        if len(set(layer_dims)) > 1:
            raise ConfigError(
                f"scalar_mix needs layers of equal width, but they have widths {layer_dims}; use concat or gated_xattn",
                where,
            )
        self.out_dim = layer_dims[0]
        self.weights = nn.Parameter(torch.zeros(len(layer_dims)))
        self.gamma = nn.Parameter(torch.ones(()))

    def mix_weights(self) -> torch.Tensor:
        return self.weights.softmax(-1)

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        self._check(layers, same_tokens=True)
        w = self.mix_weights().to(layers[0].dtype)
        out = sum(w[i] * h for i, h in enumerate(layers))
        return self.gamma.to(out.dtype) * out


class GatedCrossAttentionFusion(Fusion):
    """``deep + tanh(gate) * CrossAttn(LN(deep), [LN(proj_l(h_l)) for the other layers])``, gate = 0 at init."""

    def __init__(self, layer_dims: list[int]):
        super().__init__(layer_dims)
        d = layer_dims[0]
        self.out_dim = d
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(k), nn.Linear(k, d)) for k in layer_dims[1:])
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, _heads_for(d), batch_first=True)
        self.gate = nn.Parameter(torch.zeros(d))

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        self._check(layers, same_tokens=False)
        deep = layers[0]
        others = torch.cat([p(h) for p, h in zip(self.proj, layers[1:], strict=False)], dim=1)
        q = self.norm_q(deep)
        kv = self.norm_kv(others)
        fused, _ = self.attn(q, kv, kv, need_weights=False)
        return deep + torch.tanh(self.gate).to(deep.dtype) * fused


def build_fusion(kind: str, layer_dims: list[int], where: str = "model.connectors.*.fusion") -> Fusion:
    if len(layer_dims) < 2:
        raise ConfigError(f"fusion needs at least two encoder layers, got {len(layer_dims)}", where)
    if kind == "concat":
        return ConcatFusion(layer_dims)
    if kind == "scalar_mix":
        return ScalarMix(layer_dims, where=where)
    if kind == "gated_xattn":
        return GatedCrossAttentionFusion(layer_dims)
    raise ConfigError(f"unknown fusion {kind!r}; valid choices: {', '.join(FUSIONS)}", where)
