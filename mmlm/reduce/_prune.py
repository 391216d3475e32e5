"""Pruning inside the LLM: runs a reducer's keep schedule on a Hugging Face decoder-only LM.

``Pruning(llm, reducer, media, attention_mask)`` is a context manager that puts a forward pre-hook
on every decoder layer from the first pruning layer on. At a pruning layer it computes one explicit
attention (that layer's own query and key projections and rotary embedding, heads averaged), asks
the reducer to score the positions, keeps every text position and the best-scored media positions
the schedule allows, and **gathers** the kept hidden states; the layers after it read only those,
with their original position ids (rotary embeddings gathered with them) and an attention mask
rebuilt for them, so each layer keeps using the attention backend it was given (SDPA, eager,
flash attention) rather than an attention mask over all positions. Rows that keep different
numbers of tokens are left-padded with masked slots, as a left-padded batch is.

The KV cache of a pruned layer holds only its kept positions; during decoding the hooks give each
such layer a mask over its own cache (kept prompt positions, then the generated tokens).

``gather=False`` is the reference: every position stays and dropped ones are masked as keys (what
AIM's own code does with eager attention); tests check that both give the same tokens.
"""

from __future__ import annotations

import torch

from mmlm.reduce._base import Reducer, keep_count


def decoder_layers(llm) -> torch.nn.ModuleList:
    base = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "base_model", llm)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"token pruning needs a decoder-only LM whose decoder keeps its layers in .layers; "
            f"{type(llm).__name__} does not"
        )
    return layers


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def attention_probs(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allow: torch.Tensor):
    """The layer's attention probabilities ``[B, S, S]`` (heads averaged) over ``hidden [B, S, D]``;
    ``allow [B, S, S]`` says which key each query may read."""
    attn = layer.self_attn
    norm = getattr(layer, "input_layernorm", None)
    if norm is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "head_dim")):
        raise ValueError(
            f"token pruning scores attention with the layer's input_layernorm and self_attn.q_proj/k_proj; "
            f"{type(layer).__name__} does not have them"
        )
    h = norm(hidden)
    B, S, _ = h.shape
    hd = attn.head_dim
    q = attn.q_proj(h).view(B, S, -1, hd)
    k = attn.k_proj(h).view(B, S, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3, OLMo2: per-head norms before the rotary embedding
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    if cos.shape[-1] != hd:
        raise ValueError(
            f"token pruning needs a rotary embedding over the whole head ({hd}); this one covers {cos.shape[-1]}"
        )
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * (hd**-0.5)
    logits = logits.masked_fill(~allow.unsqueeze(1), float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


class Pruning:
    def __init__(self, llm, reducer: Reducer, media: torch.Tensor, attention_mask: torch.Tensor, gather: bool = True):
        self.layers = decoder_layers(llm)
        self.schedule = reducer.keep_schedule(len(self.layers))
        self.reducer = reducer
        self.media = media.bool()  # [B, L]: the modality's positions
        self.real = attention_mask.bool()  # [B, L]: positions that are not padding
        self.n_media = self.media.sum(dim=1).tolist()
        self.gather = gather
        self.impl = getattr(getattr(llm, "config", None), "_attn_implementation", "sdpa") or "sdpa"
        if self.impl not in ("sdpa", "eager", "flash_attention_2") and self.schedule:
            raise ValueError(
                f"token pruning works with the sdpa, eager and flash_attention_2 attention; this LLM uses {self.impl!r}"
            )
        B, L = self.media.shape
        full = torch.arange(L, device=self.media.device).expand(B, L)
        self.cur = (full, torch.ones(B, L, dtype=torch.bool, device=self.media.device))  # slots: (index, valid)
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> its slots (for decoding)
        self.decoded = 0  # decoding steps seen
        self.kept: dict[int, list[int]] = {}  # layer -> media tokens kept per row (for tests and logs)
        # layer -> (input length, gather index or None, kwargs given): replayed when activation
        # checkpointing recomputes the layer in backward
        self.plans: dict[int, tuple] = {}
        self._handles: list = []

    # ------------------------------------------------------------------ context
    def __enter__(self):
        if self.schedule:
            first = min(self.schedule)
            for i in range(first, len(self.layers)):
                self._handles.append(
                    self.layers[i].register_forward_pre_hook(self._hook(i, i == first), with_kwargs=True)
                )
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ masks
    def _keyok(self, idx, valid):
        return valid & self.real.gather(1, idx)

    def _format(self, allow: torch.Tensor, keyok: torch.Tensor, dtype):
        """``allow [B, Q, K]`` in the form the attention backend takes."""
        if self.impl == "flash_attention_2":
            return keyok.long()  # a padding mask; flash attention is causal over the slots itself
        if self.impl == "eager":
            return (
                torch.zeros(allow.shape, dtype=dtype, device=allow.device)
                .masked_fill(~allow, torch.finfo(dtype).min)
                .unsqueeze(1)
            )
        return allow.unsqueeze(1)

    def _prefill_allow(self, idx, valid):
        keyok = self._keyok(idx, valid)
        S = idx.shape[1]
        allow = (idx.unsqueeze(1) <= idx.unsqueeze(2)) & keyok.unsqueeze(1)
        allow = allow | torch.eye(S, dtype=torch.bool, device=idx.device)  # no empty row (a padding slot reads itself)
        return allow, keyok

    # ------------------------------------------------------------------ the hook
    def _hook(self, layer: int, first: bool):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            plan = self.plans.get(layer)
            if plan is not None and hidden.shape[1] == plan[0] and torch.is_grad_enabled():
                # activation checkpointing runs the layer again in backward: the same cut again
                sel, updates = plan[1], plan[2]
                if sel is not None:
                    hidden = hidden.gather(1, sel.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
                kwargs.update(updates)
                return self._with_hidden(args, kwargs, hidden)
            if layer in self.state:  # decoding: one new token per row
                if first:
                    self.decoded += 1
                idx, valid = self.state[layer]
                keyok = torch.cat(
                    [
                        self._keyok(idx, valid),
                        torch.ones(idx.shape[0], self.decoded, dtype=torch.bool, device=idx.device),
                    ],
                    dim=1,
                )
                kwargs["attention_mask"] = self._format(keyok.unsqueeze(1), keyok, hidden.dtype)
                return args, kwargs
            cos, sin = kwargs["position_embeddings"]
            full_cos, full_sin, full_pos = cos, sin, kwargs.get("position_ids")
            idx, valid = self.cur

            def take(t):
                if t is None:
                    return None
                t = t.expand(idx.shape[0], *t.shape[1:]) if t.shape[0] == 1 else t
                return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))

            allow, keyok = self._prefill_allow(idx, valid)
            in_len, sel = hidden.shape[1], None
            if layer in self.schedule:
                with torch.no_grad():  # the choice is not differentiable: no graph for the scores
                    probs = attention_probs(module, hidden, take(full_cos), take(full_sin), allow)
                media = self.media.gather(1, idx) & keyok
                text = keyok & ~media
                last = torch.where(keyok, torch.arange(idx.shape[1], device=idx.device), -1).max(dim=1).values
                score = self.reducer.scores(probs, text, last).masked_fill(~media, float("-inf"))
                frac = self.schedule[layer]
                keep = valid & ~self.media.gather(1, idx)
                counts = []
                for b in range(idx.shape[0]):
                    n = keep_count(int(self.n_media[b]), frac)
                    n = min(n, int(media[b].sum()))
                    counts.append(n)
                    if n:
                        keep[b, score[b].topk(n).indices] = True
                self.kept[layer] = counts
                if self.gather:
                    rows = [keep[b].nonzero().squeeze(1) for b in range(idx.shape[0])]
                    width = max(len(r) for r in rows)
                    sel = torch.zeros(idx.shape[0], width, dtype=torch.long, device=idx.device)
                    valid = torch.zeros(idx.shape[0], width, dtype=torch.bool, device=idx.device)
                    for b, r in enumerate(rows):
                        sel[b, width - len(r) :] = r
                        valid[b, width - len(r) :] = True
                    idx = idx.gather(1, sel)
                    hidden = hidden.gather(1, sel.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
                else:
                    valid = keep
                self.cur = (idx, valid)
                allow, keyok = self._prefill_allow(idx, valid)
            self.state[layer] = (idx, valid)
            updates = {"position_embeddings": (take(full_cos), take(full_sin))}
            if full_pos is not None:
                updates["position_ids"] = take(full_pos)
            if kwargs.get("cache_position") is not None:
                updates["cache_position"] = torch.arange(idx.shape[1], device=idx.device)
            updates["attention_mask"] = self._format(allow, keyok, hidden.dtype)
            kwargs.update(updates)
            self.plans[layer] = (in_len, sel, updates)
            return self._with_hidden(args, kwargs, hidden)

        return hook

    @staticmethod
    def _with_hidden(args, kwargs, hidden):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs
