"""Ovis visual embedding table: each visual token is a probability-weighted mix of a learned table.

Head ``Linear(Dv, K - k, bias=False) -> LayerNorm -> softmax`` (in fp32) gives a distribution over
the first ``K - k`` entries of a visual vocabulary of ``K = vocab_size`` entries; the last
``k = 2`` entries are reserved for the image-begin and image-end indicator tokens, which are
one-hot rows. Every distribution is multiplied by the table ``VTE: K x out_dim``. The output of
one image is ``[begin, N visual embeddings, end]``: ``num_output_tokens(N) = N + 2``.
With ``init_from_llm`` the table starts as N(mean, std) of the LLM's input embedding table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmlm.connectors._base import Connector, ConnectorOptions
from mmlm.registry import CONNECTORS

NUM_INDICATORS = 2  # image begin, image end


class OvisOptions(ConnectorOptions):
    # K, the rows of the visual embedding table, the 2 indicator entries included (Ovis: 65536 or 131072)
    vocab_size: int = Field(8192, gt=NUM_INDICATORS)
    init_from_llm: bool = False  # VTE ~ N(mean, std) of the LLM's input embedding table


@CONNECTORS.register("ovis", options=OvisOptions, summary="Ovis visual embedding table with begin/end indicator tokens")
class OvisConnector(Connector):
    def __init__(self, opts: OvisOptions, in_dim: int, out_dim: int, llm=None):
        super().__init__(in_dim, out_dim)
        self.opts = opts
        K = opts.vocab_size
        self.vocab_size = K
        self.begin_index = K - NUM_INDICATORS
        self.end_index = K - NUM_INDICATORS + 1
        self.head = nn.Linear(in_dim, K - NUM_INDICATORS, bias=False)
        self.head_norm = nn.LayerNorm(K - NUM_INDICATORS)
        self.vte = nn.Embedding(K, out_dim)
        if opts.init_from_llm:
            if llm is None:
                raise ValueError("ovis: init_from_llm needs the LLM (its input embedding table gives the mean and std)")
            w = llm.get_input_embeddings().weight.detach().float()
            with torch.no_grad():
                self.vte.weight.normal_(mean=float(w.mean()), std=float(w.std()))

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens + NUM_INDICATORS

    def probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """Distribution over the K visual words ``[B, N, K]`` (indicator entries are 0)."""
        logits = self.head_norm(self.head(feats)).float()
        probs = logits.softmax(-1)
        return F.pad(probs, (0, NUM_INDICATORS))

    def indicator_probabilities(self, batch: int, device=None) -> torch.Tensor:
        """One-hot rows of the begin and end indicators ``[B, 2, K]``."""
        idx = torch.tensor([self.begin_index, self.end_index], device=device)
        return F.one_hot(idx, self.vocab_size).float().unsqueeze(0).expand(batch, -1, -1)

    def forward(self, feats):
        B = feats.shape[0]
        probs = self.probabilities(feats)
        ind = self.indicator_probabilities(B, feats.device)
        probs = torch.cat([ind[:, :1], probs, ind[:, 1:]], dim=1)
        table = self.vte.weight
        return probs.to(table.dtype) @ table
