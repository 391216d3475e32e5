"""AlignVLM: every visual token is a convex mix of the LLM's text-token embeddings.

``F1 = LN(W1 f)`` with ``W1: Dv -> D``; ``P = softmax(LN(W2 F1))`` with ``W2: D -> V`` initialised
from (a copy of) the LLM's output head; output ``P @ E`` with ``E`` the LLM's input embedding matrix.

``E`` is used by reference: the LLM given at build time is held outside the module tree and its
current input embeddings are read at forward time, so ``E`` is neither a parameter nor a buffer of
the connector, a checkpoint never stores it twice, and training the LLM's embeddings moves it. Tokens are
processed ``chunk_tokens`` at a time, so at most one ``[chunk, V]`` matrix exists at once; during
training each chunk is checkpointed (recomputed in the backward pass) so the saved activations do
not grow to ``[tokens, V]`` either.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmlm.connectors._base import Connector, ConnectorOptions, LLMRef
from mmlm.registry import CONNECTORS


class AlignVLMOptions(ConnectorOptions):
    chunk_tokens: int = Field(512, ge=1)  # visual tokens per [chunk, V] matrix
    checkpoint_chunks: bool = True  # recompute each chunk in backward instead of keeping its [chunk, V] activations


@CONNECTORS.register(
    "alignvlm",
    options=AlignVLMOptions,
    summary="AlignVLM: softmax over the LLM vocabulary, mix of its input embeddings",
)
class AlignVLMConnector(Connector):
    def __init__(self, opts: AlignVLMOptions, in_dim: int, out_dim: int, llm=None):
        super().__init__(in_dim, out_dim)
        if llm is None:
            raise ValueError(
                "alignvlm needs the LLM: its output head initialises W2 and its input embeddings are mixed"
            )
        head = llm.get_output_embeddings()
        emb = llm.get_input_embeddings()
        if head is None or emb is None:
            raise ValueError("alignvlm: the LLM has no output head or input embeddings")
        V, D = emb.weight.shape
        if D != out_dim:
            raise ValueError(f"alignvlm: the LLM embeddings have width {D}, not the connector's out_dim {out_dim}")
        if tuple(head.weight.shape) != (V, D):
            raise ValueError(f"alignvlm: the LLM output head has shape {tuple(head.weight.shape)}, expected {(V, D)}")
        self.opts = opts
        self.vocab_size = V
        self.w1 = nn.Linear(in_dim, out_dim)
        self.ln1 = nn.LayerNorm(out_dim)
        self.w2 = nn.Linear(out_dim, V, bias=False)
        with torch.no_grad():
            self.w2.weight.copy_(head.weight.detach().to(self.w2.weight.dtype))  # a copy, trained on its own
        self.ln2 = nn.LayerNorm(V)
        self._llm = LLMRef(llm)

    # ---------------------------------------------------------------- pieces
    def embedding_matrix(self) -> torch.Tensor:
        """E, the LLM's input embedding matrix ``[V, D]`` (by reference, never copied)."""
        return self._llm.obj.get_input_embeddings().weight

    def _probs(self, f1: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.w2(f1)).float().softmax(-1)

    def probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """P ``[B, N, V]`` for all tokens at once (for inspection and tests; ``forward`` chunks)."""
        return self._probs(self.ln1(self.w1(feats)))

    def embed_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """``P @ E``: distributions over the LLM vocabulary -> mixes of its input embeddings."""
        E = self.embedding_matrix()
        return probs.to(E.dtype) @ E

    def _chunk(self, f1: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        return self._probs(f1).to(E.dtype) @ E

    # ---------------------------------------------------------------- forward
    def forward(self, feats):
        B, N, _ = feats.shape
        E = self.embedding_matrix()
        f1 = self.ln1(self.w1(feats)).reshape(B * N, -1)
        grad = torch.is_grad_enabled() and (f1.requires_grad or E.requires_grad)
        outs = []
        for start in range(0, B * N, self.opts.chunk_tokens):
            part = f1[start : start + self.opts.chunk_tokens]
            if grad and self.opts.checkpoint_chunks:
                outs.append(checkpoint(self._chunk, part, E, use_reentrant=False))
            else:
                outs.append(self._chunk(part, E))
        return torch.cat(outs, 0).reshape(B, N, -1)
