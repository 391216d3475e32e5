"""MultimodalLM: encoders -> connectors -> LLM, by composition.

``build(config)`` assembles the parts a pipeline config names and returns the model with its
``processor``; ``MultimodalLM.save`` writes a checkpoint directory that ``mmlm.load``
(``mmlm/checkpoint.py``) reads back.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from mmlm.config import PipelineConfig
from mmlm.connectors import build_connector
from mmlm.embed.pooling import build_pooling
from mmlm.errors import ConfigError, PlaceholderMismatch
from mmlm.images import load_image
from mmlm.llm import last_mlp_only_at, load_llm
from mmlm.modalities import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from mmlm.processor import IGNORE_INDEX, MediaSpec, Processor
from mmlm.registry import ENCODERS
from mmlm.storage import CHECKPOINT_FORMAT, atomic_dir, save_tensors, tensor_digest
from mmlm.train.lora import canonical

log = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class MultimodalOutput:
    """What a forward returns: the LLM's ``logits`` (and ``loss`` when ``labels`` were given, as in
    transformers), its ``hidden_states`` when asked for, and ``media_tokens``: each modality's
    connector output ``[items, M, D]`` (transformers' ``image_hidden_states``), for objectives."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple | None = None
    media_tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    # with pruning inside the LLM the logits cover only the positions its last layer read: their
    # indices in the batch ``[B, S]`` and which are real (None: the logits cover every position)
    kept: tuple[torch.Tensor, torch.Tensor] | None = None
    # with ``logits_to_keep`` the logits cover these sequence positions only (1-D, the same for every row)
    positions: torch.Tensor | None = None
    # with a 2-D ``logits_to_keep`` mask: the (rows, columns) of the logits, which are ``[1, N, V]``
    cells: tuple[torch.Tensor, torch.Tensor] | None = None

    def labels_for(self, labels: torch.Tensor) -> torch.Tensor:
        """The batch's ``labels`` for the positions the logits cover."""
        if self.kept is None:
            return labels
        idx, valid = self.kept
        return labels.to(idx.device).gather(1, idx).masked_fill(~valid, IGNORE_INDEX)

    def targets_for(self, labels: torch.Tensor) -> torch.Tensor:
        """The next-token target of each logit (IGNORE_INDEX where none is learnt): ``labels``
        shifted by one along the sequence the logits cover."""
        shifted = F.pad(self.labels_for(labels).to(self.logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]
        if self.cells is not None:
            return shifted[self.cells].unsqueeze(0)
        return shifted if self.positions is None else shifted[:, self.positions.to(shifted.device)]


class MultimodalLM(nn.Module):
    def __init__(
        self,
        config: PipelineConfig,
        encoders: nn.ModuleDict,
        connectors: nn.ModuleDict,
        llm,
        tokenizer,
        pretrained_prefixes: Iterable[str] = (),
        pooler: nn.Module | None = None,
        reducers: nn.ModuleDict | None = None,
    ):
        super().__init__()
        self.config = config
        self.encoders = encoders
        self.connectors = connectors
        self.llm = llm
        # pools hidden states into one vector per sequence (``embed``); learned for latent attention
        self.pooler = pooler if pooler is not None else build_pooling(config.model.embedding.pooling, _width(llm))
        self.tokenizer = tokenizer
        # parameter-name prefixes whose weights come from a pretrained source the checkpoint references
        self.pretrained_prefixes = tuple(pretrained_prefixes)
        # part (llm, or an encoder's modality) -> the LoRA settings of the adapters it carries (mmlm/train/lora.py)
        self.lora: dict[str, dict] = {}
        # modality -> its token reducer (mmlm/reduce/): merging before the LLM, pruning inside it
        self.reducers = reducers if reducers is not None else nn.ModuleDict()
        # digests of those weights as the source gave them: a checkpoint stores the ones that differ
        skeleton = tokenizer is None  # parameters on the meta device, for their names (``skeleton``)
        self.source_digests = {} if skeleton else {k: tensor_digest(v) for k, v in self._from_source().items()}
        media = {}
        self.media_pos = nn.ParameterDict()
        width = llm.get_input_embeddings().weight.shape[1]
        for name, enc in encoders.items():
            n_out = connectors[name].num_output_tokens(enc.num_tokens)
            n_llm = self.reducers[name].num_output_tokens(n_out) if name in self.reducers else n_out
            media[name] = MediaSpec.of(name, n_llm, enc.preprocess, getattr(enc, "tiling", None))
            if config.model.media_position.get(name) == "learned":  # one per connector token, before merging
                self.media_pos[name] = nn.Parameter(torch.zeros(n_out, width))
        self.processor = None if skeleton else Processor(tokenizer, media, config.processor)

    # ------------------------------------------------------------------ embedding
    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def llm_keeps_logits(self) -> bool:
        """Whether the LLM's forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
        return "logits_to_keep" in inspect.signature(self.llm.forward).parameters

    @property
    def llm_head_apart(self) -> bool:
        """Whether the LLM's logits are its output embeddings applied to its decoder's last hidden
        state and nothing else (transformers' Llama, Qwen, Mistral, SmolLM...; not models that scale
        or soft-cap their logits): then the LM head can run on any set of (row, position) cells."""
        get = getattr(self.llm, "get_decoder", None)
        if get is None or self.llm.get_output_embeddings() is None:
            return False
        cfg = getattr(self.llm, "config", None)
        if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
            return False
        return isinstance(get(), nn.Module) and get() is not self.llm

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The entries of a processor batch that ``forward`` takes (text inputs and media tensors);
        labels and annotations stay behind for the objectives."""
        keys = (*TEXT_INPUTS, *(spec.batch_key for spec in self.processor.media.values()))
        return {k: batch[k] for k in keys if batch.get(k) is not None}

    def embed_inputs(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor] | None = None):
        """Token embeddings with each placeholder run replaced by its media tokens; returns them and
        each modality's connector output ``[items, M, D]``. ``media`` maps batch keys to tensors."""
        emb_layer = self.llm.get_input_embeddings()
        embeds = emb_layer(input_ids.clamp(min=0))
        media_tokens: dict[str, torch.Tensor] = {}
        for name, spec in self.processor.media.items():
            mask = input_ids == spec.token_id
            n_slots = int(mask.sum())
            values = (media or {}).get(spec.batch_key)
            if values is None:
                if n_slots:
                    raise PlaceholderMismatch(
                        f"{n_slots} {name} placeholder positions in input_ids but no {spec.batch_key} were given"
                    )
                continue
            tokens = self.connect(name, values)
            media_tokens[name] = tokens
            if name in self.media_pos:
                tokens = tokens + self.media_pos[name].to(tokens.dtype)
            if name in self.reducers:
                tokens = self.reducers[name].merge(tokens)
            n_feat = tokens.shape[0] * tokens.shape[1]
            if n_slots != n_feat:
                raise PlaceholderMismatch(
                    f"{name} features and {name} tokens do not match: {n_feat} feature vectors "
                    f"({tokens.shape[0]} items x {tokens.shape[1]} tokens) for {n_slots} placeholder positions"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), tokens.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        return embeds, media_tokens

    def connect(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """Modality ``name``'s connector output ``[items, M, D]`` for its batch tensor ``values``."""
        return self.connectors[name](self.encoders[name](values.to(self.device)))

    def media_only(self, **media) -> MultimodalOutput:
        """The connector outputs of a batch's media, without running the LLM: for a stage whose
        objectives read nothing else (SEA alignment), which then costs the encoder and connector only."""
        tokens = {}
        for name, spec in self.processor.media.items():
            if media.get(spec.batch_key) is not None:
                tokens[name] = self.connect(name, media[spec.batch_key])
        return MultimodalOutput(None, media_tokens=tokens)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        labels=None,
        output_hidden_states: bool = False,
        logits_to_keep: torch.Tensor | None = None,
        **media,
    ) -> MultimodalOutput:
        """``media``: one tensor per modality under its batch key (``pixel_values=`` for images).
        ``logits_to_keep``: the sequence positions (1-D) whose logits are computed, as transformers'
        causal LMs take it; the LM head then never runs on the others (``supervised_positions``). A
        boolean ``[B, S]`` mask instead names exact cells (``supervised_cells``): the LM head runs on
        those alone and the logits are ``[1, N, V]`` in row-major order (``llm_head_apart`` models;
        others compute the positions any row needs)."""
        known = {spec.batch_key for spec in self.processor.media.values()}
        unknown = sorted(set(media) - known)
        if unknown:
            raise TypeError(f"unexpected inputs {unknown}; this model takes media as {sorted(known) or 'none'}")
        embeds, media_tokens = self.embed_inputs(input_ids, media)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if logits_to_keep is not None and logits_to_keep.ndim == 2:
            if self.llm_head_apart and not any(r.prunes for r in self.reducers.values()):
                return self._cell_forward(
                    embeds, attention_mask, position_ids, labels, output_hidden_states, logits_to_keep, media_tokens
                )
            logits_to_keep = logits_to_keep.any(0).nonzero().squeeze(1)  # the positions some row needs
        keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep.to(embeds.device)}
        with self.pruning(input_ids, mask) as pruning:
            if keep and pruning is not None:
                raise ValueError("logits_to_keep cannot be combined with pruning inside the LLM")
            out = self.llm(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels if pruning is None and not keep else None,
                output_hidden_states=output_hidden_states,
                use_cache=False,
                **keep,
            )
        if pruning is None:
            result = MultimodalOutput(out.logits, out.loss, getattr(out, "hidden_states", None), media_tokens)
            if keep:
                result.positions = keep["logits_to_keep"]
                if labels is not None:
                    from mmlm.objectives.lm import token_loss

                    result.loss = token_loss(out.logits, result.targets_for(labels))
            return result
        # the logits are for the positions the last layer read: the labels follow them
        from mmlm.objectives.lm import causal_lm_loss

        result = MultimodalOutput(out.logits, None, getattr(out, "hidden_states", None), media_tokens, kept=pruning.cur)
        if labels is not None:
            result.loss = causal_lm_loss(out.logits, result.labels_for(labels))
        return result

    def _cell_forward(self, embeds, attention_mask, position_ids, labels, output_hidden_states, cells, media_tokens):
        """The decoder on every position, the LM head on the ``cells`` (a ``[B, S]`` mask) only."""
        out = self.llm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )
        at = cells.to(embeds.device).nonzero(as_tuple=True)
        logits = self.llm.get_output_embeddings()(out.last_hidden_state[at]).unsqueeze(0)
        result = MultimodalOutput(logits, None, getattr(out, "hidden_states", None), media_tokens, cells=at)
        if labels is not None:
            from mmlm.objectives.lm import token_loss

            result.loss = token_loss(logits, result.targets_for(labels))
        return result

    def pruning(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gather: bool = True):
        """A context in which the LLM prunes media tokens as the model's pruning reducer says
        (``mmlm/reduce/_prune.py``); it yields the ``Pruning`` run, or None when nothing prunes."""
        for name, red in self.reducers.items():
            if red.prunes:
                from mmlm.reduce._prune import Pruning

                media = input_ids.to(self.device) == self.processor.media[name].token_id
                return Pruning(self.llm, red, media, attention_mask.to(self.device), gather=gather)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ embeddings
    @property
    def embedding_width(self) -> int:
        return _width(self.llm)

    def pool(self, batch: dict[str, Any]) -> torch.Tensor:
        """The pooled final hidden states ``[B, D]`` of a processor batch, with gradients (the
        contrastive objective trains through it); neither normalised nor truncated."""
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        embeds, _ = self.embed_inputs(ids, batch)
        pos = batch.get("position_ids")
        pos = pos.to(self.device) if pos is not None else (mask.cumsum(-1) - 1).clamp(min=0)
        with last_mlp_only_at(self.llm, self.pooler.reads(mask)):
            hidden = self.llm.base_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False
            ).last_hidden_state
        return self.pooler(hidden, mask)

    def embed(
        self, items, instruction: str | None = None, dim: int | None = None, side: str = "query", batch_size: int = 32
    ) -> torch.Tensor:
        """L2-normalised float32 vectors ``[N, D]`` for texts, images (PIL images or ``pathlib.Path``)
        or mappings with ``text``/``image``/``instruction``, written with ``model.embedding``'s prompt
        templates for ``side`` (query or candidate) and pooled by its pooling; ``dim`` truncates
        (Matryoshka) before normalising. One item (not a list) gives ``[1, D]``."""
        from mmlm.embed.extract import embed

        if isinstance(items, (str, dict)) or not isinstance(items, (list, tuple)):
            items = [items]
        return embed(self, list(items), instruction=instruction, dim=dim, side=side, batch_size=batch_size)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        max_new_tokens: int | Sequence[int] = 32,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        seed: int | None | Sequence[int | None] = None,
        stream: Callable[[int, list[int]], Iterable[int] | None] | None = None,
    ) -> list[list[int]]:
        """Decode with the LLM's KV cache. ``batch`` comes from the processor with left padding.
        Greedy when a row's ``temperature`` is 0; otherwise sampling with top-k / top-p. Every
        option may be one value for all rows or a sequence of one per row; each row samples from
        its own generator (seeded by its ``seed``), so a row's tokens do not depend on the rows
        decoded beside it. ``stream(step, tokens)`` is called with the new token of each sequence
        (-1 once a sequence has finished) and may return rows to finish now (a stop string was
        seen, the client went away)."""
        was_training = self.training
        if was_training:  # switching modes walks every module (2 ms on the demo model): only when needed
            self.eval()
        try:
            mask = batch["attention_mask"].to(self.device)
            if (mask[:, -1] == 0).any():
                raise ValueError("generate needs left padding: build the batch with padding_side='left'")
            B = mask.shape[0]
            rows = _per_row(B, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
            seeds = _per_row(B, seed=seed)["seed"]
            gens = []
            for s in seeds:
                g = torch.Generator(device=self.device)
                if s is not None:
                    g.manual_seed(int(s))
                else:
                    g.seed()
                gens.append(g)
            limits = torch.tensor(rows["max_new_tokens"], device=self.device)
            ids = batch["input_ids"].to(self.device)
            embeds, _ = self.embed_inputs(ids, batch)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with self.pruning(ids, mask):  # pruned layers keep their own (shorter) KV cache
                return self._decode(embeds, mask, pos, rows, gens, limits, B, stream)
        finally:
            if was_training:
                self.train()

    def _decode(self, embeds, mask, pos, rows, gens, limits, B, stream) -> list[list[int]]:
        """Prefill once, then one token per step with the KV cache (``generate``'s loop)."""
        kw = _cache_kwarg(self.llm)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        past = _cache_of(out)
        logits = out.logits[:, -1, :].float()
        stops = torch.tensor(sorted(self.processor.stop_token_ids()) or [-1], device=self.device)
        done = limits <= 0
        result: list[list[int]] = [[] for _ in range(B)]
        last_pos = pos[:, -1]
        for step in range(int(limits.max()) if B else 0):
            nxt = _pick_rows(logits, rows["temperature"], rows["top_p"], rows["top_k"], gens)
            finished_now = torch.isin(nxt, stops)
            # one host transfer per step: the new token of each live sequence, -1 for the others
            toks = torch.where(done | finished_now, torch.full_like(nxt, -1), nxt).tolist()
            for i, t in enumerate(toks):
                if t >= 0:
                    result[i].append(t)
            done = done | finished_now | (limits <= step + 1)
            if stream is not None:
                for i in stream(step, toks) or ():
                    done[i] = True
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            last_pos = last_pos + 1
            out = self.llm(
                input_ids=nxt.unsqueeze(1),
                attention_mask=mask,
                position_ids=last_pos.unsqueeze(1),
                use_cache=True,
                **{kw: past},
            )
            past = _cache_of(out)
            logits = out.logits[:, -1, :].float()
        return result

    def chat(self, messages: list[dict], media: dict | None = None, **kw) -> str:
        """Answer a conversation; ``media`` maps a modality to its items in order (PIL images or
        image file paths, read with ``processor.max_image_pixels``; sound files; videos: lists of
        frames, frame folders or video files)."""
        limit = self.processor.config.max_image_pixels

        def read(name, p):
            if not isinstance(p, (str, os.PathLike)):
                return p
            if name == "audio":
                from mmlm.audio.whisper_encoder import read_audio

                return read_audio(p, self.processor.media["audio"].transform.sampling_rate)
            if name == "video":  # without a video encoder, the processor refuses it by name
                from mmlm.video.read import read_video

                spec = self.processor.media.get("video")
                return read_video(p, spec.transform.num_frames, limit) if spec else p
            return load_image(p, limit)

        media = {name: [read(name, p) for p in items] for name, items in (media or {}).items()}
        batch = self.processor([messages], [media], add_generation_prompt=True)
        return self.processor.decode(self.generate(batch, **kw)[0])

    def ask(self, question: str, image=None, audio=None, video=None, **kw) -> str:
        """One question about no image, one, or a list of them (PIL images or file paths, in order),
        audio clips (waveforms at the encoder's sampling rate, ``(waveform, rate)`` pairs or sound
        files) and videos (frame folders, video files, or a list of PIL frames; several videos: a list
        of those). A question without ``<image>`` (``<audio>``, ``<video>``) gets one placeholder per
        item in front, video first, then audio; one that has them must have as many as there are items."""
        media = {}
        for name, placeholder, given in (
            ("image", IMAGE_PLACEHOLDER, image),
            ("audio", AUDIO_PLACEHOLDER, audio),
            ("video", VIDEO_PLACEHOLDER, video),
        ):
            if name == "video" and isinstance(given, list) and given and isinstance(given[0], Image.Image):
                given = [given]  # one video given as its frames
            items = [] if given is None else list(given) if isinstance(given, list) else [given]
            n = question.count(placeholder)
            if n == 0 and items:
                question = placeholder * len(items) + "\n" + question
            elif n != len(items):
                raise ValueError(
                    f"the question has {n} {placeholder} placeholder(s) but {len(items)} "
                    f"{ {'image': 'image(s)', 'audio': 'audio clip(s)', 'video': 'video(s)'}[name] } were given"
                )
            if items:
                media[name] = items
        return self.chat([{"role": "user", "content": question}], media or None, **kw)

    # ------------------------------------------------------------------ checkpoint
    def source_fingerprints(self) -> dict[str, str]:
        """One sha256 per pretrained prefix over the digests of the tensors its source gave."""
        import hashlib

        out = {}
        for prefix in self.pretrained_prefixes:
            h = hashlib.sha256()
            for k in sorted(k for k in self.source_digests if k.startswith(prefix)):
                h.update(f"{k}={self.source_digests[k]};".encode())
            out[prefix] = h.hexdigest()
        return out

    def _from_source(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.pretrained_prefixes)}

    def tensors_to_save(self, full: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor (``full``), or those a checkpoint must hold: the ones that do not come from a
        pretrained source, and those from a source that differ from what it gave."""
        state = self.state_dict()
        if full:
            return state
        # a layer LoRA wraps keeps its weight under ``.base_layer.``: the source's digest is found by
        # the original name, so an unchanged base weight stays out of the file
        return {
            k: v
            for k, v in state.items()
            if not k.startswith(self.pretrained_prefixes) or tensor_digest(v) != self.source_digests.get(canonical(k))
        }

    def save(self, directory, full: bool = False, metrics: dict | None = None) -> Path:
        """Write a checkpoint directory atomically: ``mmlm.yaml`` (the resolved config, referencing
        the pretrained sources), ``model.safetensors`` (``tensors_to_save``), the tokenizer files, and
        ``metrics.json`` when given. ``mmlm.load`` reads it back."""
        directory = Path(directory)
        tensors = self.tensors_to_save(full)
        with atomic_dir(directory) as tmp:
            save_tensors(
                tensors,
                tmp / "model.safetensors",
                metadata={"format": "pt", "mmlm": str(CHECKPOINT_FORMAT)},
            )
            self.tokenizer.save_pretrained(str(tmp))
            doc = {
                "mmlm": {
                    "format": CHECKPOINT_FORMAT,
                    "tensors": "full" if full else "trained",
                    "pretrained_prefixes": list(self.pretrained_prefixes),
                    # the source's tensors this file replaces: without the list, one deleted from the
                    # file would load silently from the source
                    "changed_from_source": sorted(k for k in tensors if k.startswith(self.pretrained_prefixes)),
                    # what each pretrained source gave when this model was built: a later load from a
                    # source that changed (a hub branch moved, a folder rewritten) is refused
                    "sources": self.source_fingerprints(),
                    # LoRA adapters the model carries, injected again before loading (mmlm/train/lora.py)
                    **({"lora": self.lora} if self.lora else {}),
                },
                **self.config.to_dict(),
            }
            (tmp / "mmlm.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
            if metrics is not None:
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return directory


def _cache_kwarg(llm) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept either."""
    params = inspect.signature(llm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _per_row(n: int, **options) -> dict[str, list]:
    """Each option as a list of ``n`` values: a scalar repeated, a sequence checked for length."""
    out = {}
    for name, value in options.items():
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"generate: {name} has {len(value)} values for a batch of {n} rows")
            out[name] = list(value)
        else:
            out[name] = [value] * n
    return out


def _pick_rows(logits: torch.Tensor, temperature: list, top_p: list, top_k: list, gens: list) -> torch.Tensor:
    """The next token of each row: its argmax, or a draw from its own generator."""
    nxt = logits.argmax(-1)
    for i, t in enumerate(temperature):
        if t > 0:
            nxt[i] = _pick(logits[i : i + 1], t, top_p[i], top_k[i], gens[i])[0]
    return nxt


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


def build(
    config: PipelineConfig, texts: Iterable[str] | None = None, tokenizer_dir: str | None = None, llm=None
) -> MultimodalLM:
    """Assemble the model a config names. ``texts`` feeds a from-scratch tokenizer; ``llm`` (a
    ``mmlm.llm.LoadedLLM``) reuses an LLM already loaded from the source the config names."""
    loaded = llm if llm is not None else load_llm(config.model.llm, texts=texts, tokenizer_dir=tokenizer_dir)
    return _assemble(config, loaded)


def skeleton(config: PipelineConfig) -> MultimodalLM:
    """The model a config names with every parameter on the meta device: its parameter names and
    shapes, from the parts' configs alone (no weights read, no memory taken, no tokenizer, no
    processor). ``mmlm config validate`` checks ``trainable`` patterns against it."""
    with torch.device("meta"):
        return _assemble(config, load_llm(config.model.llm, skeleton=True), skeleton=True)


def _width(llm) -> int:
    return int(llm.get_input_embeddings().weight.shape[1])


def _at(key: str, make: Callable, *args, **kwargs):
    """``make(...)``, with a part's refusal of its options (a ValueError from timm, transformers or
    the part itself) reported at the part's key path."""
    try:
        return make(*args, **kwargs)
    except ConfigError:
        raise
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        text = " ".join(str(err).split())
        generic = key.rsplit(".", 1)[0] + ".*"  # parts name their key as model.encoders.*.weights
        text = text.replace(generic, key)
        exc = FileNotFoundError if isinstance(err, FileNotFoundError) else ConfigError
        if text.startswith("model.") or exc is FileNotFoundError:
            raise exc(text) from err
        raise ConfigError(text, key) from err


def _assemble(config: PipelineConfig, loaded, skeleton: bool = False) -> MultimodalLM:
    kwargs = {"skeleton": True} if skeleton else {}
    llm_dim = loaded.model.get_input_embeddings().weight.shape[1]
    encoders = nn.ModuleDict()
    connectors = nn.ModuleDict()
    prefixes = ["llm."] if loaded.pretrained else []
    for name, comp in config.model.encoders.items():
        enc = _at(f"model.encoders.{name}", ENCODERS.create, comp, where=f"model.encoders.{name}", **kwargs)
        enc.tiling = getattr(comp.parsed(ENCODERS, f"model.encoders.{name}"), "tiling", None)
        if getattr(enc, "pretrained", False):
            prefixes.append(f"encoders.{name}.")
        encoders[name] = enc
        connectors[name] = _at(
            f"model.connectors.{name}",
            build_connector,
            config.model.connectors[name],
            enc.hidden_size,
            llm_dim,
            llm=loaded.model,
            where=f"model.connectors.{name}",
            layer_dims=[d for _, d in getattr(enc, "layer_shapes", [(enc.num_tokens, enc.hidden_size)])],
            modality=name,
        )
    pooler = _at("model.embedding.pooling", build_pooling, config.model.embedding.pooling, llm_dim)
    reducers = _reducers(config, loaded.model)
    return MultimodalLM(config, encoders, connectors, loaded.model, loaded.tokenizer, prefixes, pooler, reducers)


def _reducers(config: PipelineConfig, llm) -> nn.ModuleDict:
    """The token reducers ``model.token_reduction`` names; a pruning schedule is checked against
    the LLM's depth here, and at most one reducer may prune."""
    from mmlm.reduce import build_reducer
    from mmlm.reduce._prune import decoder_layers

    out = nn.ModuleDict()
    pruning = []
    for name, comp in config.model.token_reduction.items():
        where = f"model.token_reduction.{name}"
        red = _at(where, build_reducer, comp, where)
        if red.prunes:
            pruning.append(where)
            _at(where, red.keep_schedule, len(decoder_layers(llm)))
        out[name] = red
    if len(pruning) > 1:
        raise ConfigError(f"only one reducer may prune inside the LLM; {' and '.join(pruning)} both do", pruning[1])
    return out
