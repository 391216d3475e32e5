"""MultimodalLM: encoders -> connectors -> LLM, by composition.

``build(config)`` assembles the parts a pipeline config names and returns the model with its
``processor``; ``load(dir)`` does the same from a checkpoint directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from mmlm import connectors as connector_lib
from mmlm.config import PipelineConfig
from mmlm.llm import load_llm
from mmlm.processor import MEDIA_TOKEN_IDS, MediaSpec, Processor
from mmlm.registry import ENCODERS

log = logging.getLogger(__name__)


class PlaceholderMismatch(ValueError):
    pass


@dataclass
class MultimodalOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_states: tuple | None = None


class MultimodalLM(nn.Module):
    def __init__(self, config: PipelineConfig, encoders: nn.ModuleDict, connectors: nn.ModuleDict, llm, tokenizer,
                 pretrained_prefixes: Iterable[str] = ()):
        super().__init__()
        self.config = config
        self.encoders = encoders
        self.connectors = connectors
        self.llm = llm
        self.tokenizer = tokenizer
        # parameter-name prefixes whose weights come from a pretrained source the checkpoint references
        self.pretrained_prefixes = tuple(pretrained_prefixes)
        # names under those prefixes that training has changed (saved with the checkpoint)
        self.touched: set[str] = set()
        self.current_stage: str | None = None  # set by the trainer; connectors may act per stage
        media = {}
        self.media_pos = nn.ParameterDict()
        width = llm.get_input_embeddings().weight.shape[1]
        for name, enc in encoders.items():
            n_out = connectors[name].num_output_tokens(enc.num_tokens)
            media[name] = MediaSpec(f"<{name}>", MEDIA_TOKEN_IDS[name], n_out, enc.preprocess)
            if config.model.media_position.get(name) == "learned":
                self.media_pos[name] = nn.Parameter(torch.zeros(n_out, width))
        self.processor = Processor(tokenizer, media, config.processor)

    # ------------------------------------------------------------------ embedding
    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def encode_media(self, name: str, values: torch.Tensor, context: dict | None = None):
        enc = self.encoders[name]
        feats = enc(values.to(self.device))
        out = self.connectors[name](feats, context=context)
        return connector_lib.split_output(out)

    def embed_inputs(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor] | None = None,
                     media_meta: dict | None = None):
        """Token embeddings with each placeholder run replaced by its connector output."""
        emb_layer = self.llm.get_input_embeddings()
        embeds = emb_layer(input_ids.clamp(min=0))
        aux: dict[str, torch.Tensor] = {}
        for name, spec in self.processor.media.items():
            mask = input_ids == spec.token_id
            n_slots = int(mask.sum())
            values = (media or {}).get(name)
            if values is None:
                if n_slots:
                    raise PlaceholderMismatch(
                        f"{n_slots} {name} placeholder positions in input_ids but no {name} features were given"
                    )
                continue
            context = {"meta": media_meta or {}, "llm": self.llm, "tokenizer": self.tokenizer,
                       "training": self.training, "stage": self.current_stage,
                       "pixels": values, "preprocess": self.encoders[name].preprocess.describe()}
            tokens, a = self.encode_media(name, values, context)
            if name in self.media_pos:
                tokens = tokens + self.media_pos[name].to(tokens.dtype)
            aux.update({f"{name}.{k}": v for k, v in a.items()})
            n_feat = tokens.shape[0] * tokens.shape[1]
            if n_slots != n_feat:
                raise PlaceholderMismatch(
                    f"{name} features and {name} tokens do not match: {n_feat} feature vectors "
                    f"({tokens.shape[0]} items x {tokens.shape[1]} tokens) for {n_slots} placeholder positions"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), tokens.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        return embeds, aux

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, media_meta=None,
                output_hidden_states: bool = False, aux_weight: float = 1.0, **media_values) -> MultimodalOutput:
        media = {k[: -len("_values")]: v for k, v in media_values.items() if k.endswith("_values") and v is not None}
        unknown = [k for k in media_values if not k.endswith("_values")]
        if unknown:
            raise TypeError(f"unexpected inputs: {unknown}")
        embeds, aux = self.embed_inputs(input_ids, media, media_meta)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )
        loss = out.loss
        if loss is not None and aux:
            loss = loss + aux_weight * sum(aux.values())
        return MultimodalOutput(loss, out.logits, out.loss, aux, getattr(out, "hidden_states", None))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stream: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
        """Decode with the LLM's KV cache. ``batch`` comes from the processor with left padding.
        Greedy when ``temperature == 0``; otherwise sampling with top-k / top-p. ``stream(step,
        tokens)`` is called with the new token of each sequence (-1 once a sequence has finished)."""
        was_training = self.training
        self.eval()
        try:
            mask = batch["attention_mask"].to(self.device)
            if (mask[:, -1] == 0).any():
                raise ValueError("generate needs left padding: build the batch with padding_side='left'")
            media = {k[: -len("_values")]: v for k, v in batch.items() if k.endswith("_values")}
            embeds, _ = self.embed_inputs(batch["input_ids"].to(self.device), media, batch.get("media_meta"))
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            gen = torch.Generator(device=self.device)
            if seed is not None:
                gen.manual_seed(seed)
            kw = _cache_kwarg(self.llm)
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            past = _cache_of(out)
            logits = out.logits[:, -1, :].float()
            B = mask.shape[0]
            stops = torch.tensor(sorted(self.processor.stop_token_ids()) or [-1], device=self.device)
            done = torch.zeros(B, dtype=torch.bool, device=self.device)
            result: list[list[int]] = [[] for _ in range(B)]
            last_pos = pos[:, -1]
            for step in range(max_new_tokens):
                nxt = _pick(logits, temperature, top_p, top_k, gen)
                finished_now = torch.isin(nxt, stops)
                # one host transfer per step: the new token of each live sequence, -1 for the others
                toks = torch.where(done | finished_now, torch.full_like(nxt, -1), nxt).tolist()
                for i, t in enumerate(toks):
                    if t >= 0:
                        result[i].append(t)
                if stream is not None:
                    stream(step, toks)
                done = done | finished_now
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
                last_pos = last_pos + 1
                out = self.llm(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=last_pos.unsqueeze(1),
                               use_cache=True, **{kw: past})
                past = _cache_of(out)
                logits = out.logits[:, -1, :].float()
            return result
        finally:
            self.train(was_training)

    def chat(self, messages: list[dict], media: dict | None = None, **kw) -> str:
        batch = self.processor([messages], [media or {}], add_generation_prompt=True)
        return self.processor.decode(self.generate(batch, **kw)[0])

    def ask(self, question: str, image=None, **kw) -> str:
        content = f"<image>\n{question}" if image is not None else question
        return self.chat([{"role": "user", "content": content}], {"image": [image]} if image is not None else None, **kw)

    def save(self, directory, full: bool = False, metrics: dict | None = None) -> None:
        from mmlm.train.checkpoint import save_checkpoint

        save_checkpoint(self, directory, full=full, metrics=metrics)


def _cache_kwarg(llm) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept either."""
    import inspect

    params = inspect.signature(llm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        remove = cum - probs > top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def build(config: PipelineConfig, texts: Iterable[str] | None = None, tokenizer_dir: str | None = None,
          llm=None) -> MultimodalLM:
    """Assemble the model a config names. ``texts`` feeds a from-scratch tokenizer; ``llm`` (a
    ``mmlm.llm.LoadedLLM``) reuses an LLM already loaded from the source the config names."""
    loaded = llm if llm is not None else load_llm(config.model.llm, texts=texts, tokenizer_dir=tokenizer_dir)
    llm_dim = loaded.model.get_input_embeddings().weight.shape[1]
    encoders = nn.ModuleDict()
    connectors = nn.ModuleDict()
    prefixes = ["llm."] if loaded.pretrained else []
    for name, comp in config.model.encoders.items():
        if name not in MEDIA_TOKEN_IDS:
            raise ValueError(f"model.encoders.{name}: unknown modality; valid: {', '.join(MEDIA_TOKEN_IDS)}")
        entry = ENCODERS.get(comp.type, where=f"model.encoders.{name}.type")
        enc = entry.builder(comp.options())
        if getattr(enc, "pretrained", False):
            prefixes.append(f"encoders.{name}.")
        encoders[name] = enc
        connectors[name] = connector_lib.build(
            config.model.connectors[name], enc.hidden_size, llm_dim, llm=loaded.model, where=f"model.connectors.{name}",
            layer_dims=[d for _, d in getattr(enc, "layer_shapes", [(enc.num_tokens, enc.hidden_size)])],
        )
    model = MultimodalLM(config, encoders, connectors, loaded.model, loaded.tokenizer, prefixes)
    return model


def load(directory, **overrides) -> MultimodalLM:
    """Load a checkpoint directory written by ``MultimodalLM.save`` (safetensors only)."""
    from mmlm.train.checkpoint import load_checkpoint

    return load_checkpoint(directory, **overrides)
