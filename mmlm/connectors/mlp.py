"""MLP projector (LLaVA-1.5 ``mlp2x_gelu``): Linear(Dv, D) -> act -> Linear(D, D), depth configurable."""

from __future__ import annotations

from typing import Literal

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


@CONNECTORS.register("mlp", options=MLPOptions, summary="LLaVA MLP projector (depth, activation)")
class MLPConnector(Connector):
    def __init__(self, opts: MLPOptions, in_dim: int, out_dim: int, llm=None):
        super().__init__(in_dim, out_dim)
        hidden = opts.hidden_dim or out_dim
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if opts.layernorm else []
        dims = [in_dim] + [hidden] * (opts.depth - 1) + [out_dim]
        for i in range(opts.depth):
            if i > 0:
                layers.append(ACTIVATIONS[opts.activation]())
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        self.net = nn.Sequential(*layers)

    def forward(self, feats):
        return self.net(feats)
