"""``sea``: token-level semantic alignment of a connector's output (SEA, training only).

Each media token of the connector's output is pulled towards the LLM input embedding of its word
label (mean over the label's sub-word pieces) by an InfoNCE loss over the distinct labels of the
batch, and pushed away from the others. Labels come from the data (``labels: data``: the shapes
world writes per-patch labels at several grid sizes under ``media_meta.patch_labels``) or, with
``labels: open_clip``, from a frozen CLIP model as in the SEA paper: the image is cut into the g x g
grid of the output tokens, each cell is scored against ``word_list`` and one of its ``top_k`` words
is drawn by similarity (or the best one with ``sample: false``). The connector itself is untouched:
inference is exactly what it would be without the objective.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mmlm.errors import ConfigError
from mmlm.modalities import MODALITIES
from mmlm.objectives._base import Objective, ObjectiveOptions, StepInfo
from mmlm.registry import OBJECTIVES


class ClipScorerOptions(BaseModel):
    """The CLIP model that labels patches; the keys mean what they mean for the open_clip encoder."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_name: str
    weights: str  # local file with a full open_clip state dict (a random CLIP gives meaningless labels)
    arch_config: dict[str, Any] | None = Field(None, alias="model_config")

    @field_validator("arch_config")
    @classmethod
    def _check_arch(cls, v):
        if v is not None:
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in v]
            if missing:
                raise ValueError(
                    f"missing key(s) {', '.join(missing)} (an open_clip config has embed_dim, vision_cfg and text_cfg)"
                )
        return v


class SEAOptions(ObjectiveOptions):
    path_keys: ClassVar[dict[str, str]] = {"open_clip.weights": "file"}
    modality: str = "image"  # whose media tokens are aligned
    temperature: float = Field(0.07, gt=0)  # InfoNCE temperature: cosine similarities are divided by it
    target_grad: bool = False  # let the loss move the LLM's word embeddings too
    # weight of a second loss, ``sea_norm``: the squared log-ratio of each token's norm to its label
    # embedding's. InfoNCE on cosines leaves the norm free, and a connector trained by it alone gives
    # tokens many times the norm of the LLM's word embeddings (measured: 32 against 1.7 on SmolLM2)
    norm_weight: float = Field(0.0, ge=0)
    # where the labels come from: the data (``media_meta[label_key]``) or a CLIP model scoring each patch
    labels: Literal["data", "open_clip"] = "data"
    label_key: str = "patch_labels"  # per-image annotation written by the data source
    word_list: list[str] | None = Field(None, validate_default=True)  # candidate labels (open_clip)
    # the scoring CLIP: {model_name, weights, model_config}, as for the open_clip encoder
    open_clip: ClipScorerOptions | None = Field(None, validate_default=True)
    top_k: int = Field(3, gt=0)  # a label is drawn from each patch's top_k words ...
    label_temperature: float = Field(0.01, gt=0)  # ... by softmax(cosine / label_temperature)
    sample: bool = True  # False: always the best word
    seed: int = 0  # added to the seed derived from the micro-batch's position

    @field_validator("modality")
    @classmethod
    def _check_modality(cls, v):
        if v not in MODALITIES:
            raise ValueError(f"unknown modality {v!r}; valid choices: {', '.join(MODALITIES)}")
        return v

    @field_validator("word_list")
    @classmethod
    def _check_word_list(cls, v, info: ValidationInfo):
        if v is None:
            if info.data.get("labels") == "open_clip":
                raise ValueError("labels: open_clip needs a word_list (the words each image patch is scored against)")
            return v
        if not v or any(not isinstance(w, str) or not w.strip() for w in v):
            raise ValueError("word_list must be a non-empty list of non-empty words")
        dup = sorted({w for w in v if v.count(w) > 1})
        if dup:
            raise ValueError(f"word_list repeats {dup}")
        return v

    @field_validator("open_clip")
    @classmethod
    def _check_open_clip(cls, v, info: ValidationInfo):
        if v is None and info.data.get("labels") == "open_clip":
            raise ValueError(
                "labels: open_clip needs open_clip: {model_name, weights[, model_config]} "
                "(the CLIP model that scores the patches)"
            )
        return v

    def texts(self) -> list[str]:
        return list(self.word_list or [])


def sea_loss(
    tokens: torch.Tensor,
    labels: list[list[str]],
    embed_label,
    temperature: float,
    target_grad: bool = False,
    reduction: str = "mean",
    classes=(),
):
    """InfoNCE between token outputs ``[n, M, D]`` and the embeddings of their labels, against the
    distinct labels of the batch and ``classes`` (on several processes: every process's labels, so the
    candidates are the global batch's). ``reduction``: mean or sum over the tokens."""
    flat = [lab for per_item in labels for lab in per_item]
    uniq = sorted(set(flat).union(classes))
    index = {lab: i for i, lab in enumerate(uniq)}
    targets = torch.stack([embed_label(lab) for lab in uniq]).to(tokens.dtype)
    if not target_grad:
        targets = targets.detach()
    t = F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1)
    e = F.normalize(targets.float(), dim=-1)
    logits = t @ e.T / temperature
    y = torch.tensor([index[lab] for lab in flat], device=tokens.device)
    return F.cross_entropy(logits, y, reduction=reduction)


def norm_loss(tokens: torch.Tensor, labels: list[list[str]], embed_label, reduction: str = "mean") -> torch.Tensor:
    """Squared log-ratio of each token's norm ``[n, M, D]`` to the norm of its label's embedding
    (always detached: the word embeddings set the scale, they are not pulled towards the tokens)."""
    flat = [lab for per_item in labels for lab in per_item]
    uniq = sorted(set(flat))
    index = {lab: i for i, lab in enumerate(uniq)}
    target = torch.stack([embed_label(lab) for lab in uniq]).detach().float().norm(dim=-1)
    y = torch.tensor([index[lab] for lab in flat], device=tokens.device)
    ratio = tokens.reshape(-1, tokens.shape[-1]).float().norm(dim=-1).clamp_min(1e-6).log() - target[y].log()
    sq = ratio.square()
    return sq.mean() if reduction == "mean" else sq.sum()


_SCORE_CHUNK = 256  # patches per CLIP forward


class ClipScorer:
    """A frozen open_clip model and the unit text embeddings of the word list: a training-time
    helper of the objective, never part of the model."""

    def __init__(self, opts: ClipScorerOptions, words: list[str], where: str):
        from mmlm.vision.open_clip_encoder import OPENAI_MEAN, OPENAI_STD, create_open_clip, import_open_clip

        needed_by = f"{where}.labels 'open_clip'"
        open_clip = import_open_clip(needed_by)
        model = create_open_clip(
            opts.model_name, opts.arch_config, opts.weights, where=f"{where}.open_clip", needed_by=needed_by
        )
        model.eval().requires_grad_(False)
        self.model = model
        self.words = list(words)
        size = model.visual.image_size
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(getattr(model.visual, "image_mean", None) or OPENAI_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(getattr(model.visual, "image_std", None) or OPENAI_STD).view(1, 3, 1, 1)
        # the tokenizer open_clip pairs with this config: a custom config without hf_tokenizer_name
        # gets CLIP's BPE SimpleTokenizer (ids up to 49407) at its text_cfg context_length
        tokenizer = open_clip.get_tokenizer(opts.model_name)
        ids = tokenizer(self.words)
        vocab = getattr(model, "vocab_size", None)
        if vocab is not None and int(ids.max()) >= vocab:
            raise ValueError(
                f"{where}.open_clip: the tokenizer of {opts.model_name!r} ({type(tokenizer).__name__}) "
                f"gives token id {int(ids.max())} but the text tower has only {vocab} tokens"
            )
        with torch.no_grad():
            self.text = F.normalize(model.encode_text(ids).float(), dim=-1)  # [W, E]

    def to(self, device: torch.device) -> ClipScorer:
        if self.text.device != device:
            self.model.to(device)
            self.text, self.mean, self.std = self.text.to(device), self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def cells(self, pixels: torch.Tensor, preprocess: dict, g: int) -> torch.Tensor:
        """The VLM's normalised images ``[B, 3, H, W]`` -> CLIP inputs ``[B, g*g, 3, h, w]``, one per
        grid cell in row-major order (the order of the connector's output tokens)."""
        x = pixels.float()
        vm = torch.tensor(preprocess["mean"], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        vs = torch.tensor(preprocess["std"], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x * vs + vm).clamp(0, 1)  # back to [0, 1] RGB
        B, _, H, W = x.shape
        if H < g or W < g:
            raise ValueError(f"SEA: a {H}x{W} image cannot be cut into a {g}x{g} grid")
        rows = [round(i * H / g) for i in range(g + 1)]
        cols = [round(j * W / g) for j in range(g + 1)]
        out = []
        for i in range(g):
            for j in range(g):
                cell = x[:, :, rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
                if tuple(cell.shape[-2:]) != self.size:
                    cell = F.interpolate(
                        cell, size=self.size, mode="bicubic", align_corners=False, antialias=True
                    ).clamp(0, 1)
                out.append(cell)
        cells = torch.stack(out, dim=1)  # [B, g*g, 3, h, w]
        return (cells - self.mean.unsqueeze(1)) / self.std.unsqueeze(1)

    @torch.no_grad()
    def similarity(self, pixels: torch.Tensor, preprocess: dict, g: int) -> torch.Tensor:
        """Cosine similarity ``[B, g*g, W]`` of each grid cell with each word."""
        self.to(pixels.device)
        cells = self.cells(pixels, preprocess, g)
        B, M = cells.shape[:2]
        flat = cells.flatten(0, 1)
        feats = torch.cat(
            [self.model.encode_image(flat[i : i + _SCORE_CHUNK]).float() for i in range(0, flat.shape[0], _SCORE_CHUNK)]
        )
        return (F.normalize(feats, dim=-1) @ self.text.T).view(B, M, -1)


@OBJECTIVES.register(
    "sea", options=SEAOptions, summary="SEA: align each media token with its word label's LLM embedding (InfoNCE)"
)
class SEAObjective(Objective):
    logits = "none"  # it reads the connector's output

    def __init__(self, opts: SEAOptions, model, where: str):
        super().__init__(opts, model, where)
        if opts.modality not in model.encoders:
            raise ConfigError(
                f"the model has no {opts.modality!r} encoder; encoders: {', '.join(model.encoders) or 'none'}",
                f"{where}.modality",
            )
        # SEA reads the connector's output (media_tokens), before any token reduction merges it
        m = model.connectors[opts.modality].num_output_tokens(model.encoders[opts.modality].num_tokens)
        if math.isqrt(m) ** 2 != m:
            conn = model.config.model.connectors[opts.modality].type
            raise ConfigError(
                f"SEA labels one {opts.modality} token per grid cell, but the {conn!r} connector gives {m} tokens "
                "per item, not a square grid",
                f"{where}.type",
            )
        self.embeddings = model.llm.get_input_embeddings()  # by reference: the LLM's, as it trains
        self.tokenizer = model.tokenizer
        self.preprocess = model.encoders[opts.modality].preprocess.describe()
        self.batch_key = MODALITIES[opts.modality].batch_key
        self._label_ids: dict[str, list[int]] = {}
        self._scorer: ClipScorer | None = None  # built at first use (loading CLIP takes time)

    def scorer(self) -> ClipScorer:
        if self._scorer is None:
            self._scorer = ClipScorer(self.opts.open_clip, self.opts.word_list, self.where)
        return self._scorer

    def clip_labels(self, pixels: torch.Tensor, num_tokens: int, seed: int) -> list[list[str]]:
        """One word per output token and image, from the CLIP scores of the token's image cell."""
        g = math.isqrt(num_tokens)
        if g * g != num_tokens:
            raise ValueError(f"{self.where} (sea): open_clip labels need a square grid of tokens; got {num_tokens}")
        scorer = self.scorer()
        sims = scorer.similarity(pixels, self.preprocess, g).cpu()  # [B, M, W]
        if self.opts.sample:
            gen = torch.Generator().manual_seed(seed)
            top, idx = sims.topk(min(self.opts.top_k, sims.shape[-1]), dim=-1)
            probs = (top / self.opts.label_temperature).softmax(-1).flatten(0, 1)
            pick = torch.multinomial(probs, 1, generator=gen).view(idx.shape[:2] + (1,))
            chosen = idx.gather(-1, pick).squeeze(-1)
        else:
            chosen = sims.argmax(-1)
        return [[scorer.words[i] for i in row] for row in chosen.tolist()]

    def data_labels(self, batch: dict, n: int, num_tokens: int) -> list[list[str]]:
        labels = (batch.get("media_meta") or {}).get(self.opts.label_key)
        if not labels or len(labels) != n:
            have = len(labels or [])
            raise ValueError(
                f"{self.where} (sea): {have} of the batch's {n} {self.opts.modality} items carry "
                f"media_meta.{self.opts.label_key}; use data that labels every item, or labels: open_clip"
            )
        g = math.isqrt(num_tokens)
        out = []
        for k, lab in enumerate(labels):
            grid = lab.get(str(g)) if isinstance(lab, dict) else lab
            if grid is None or len(grid) != num_tokens:
                have = sorted(lab) if isinstance(lab, dict) else [len(lab)]
                raise ValueError(
                    f"{self.where} (sea): item {k} has no {self.opts.label_key} for {num_tokens} tokens "
                    f"(a {g}x{g} grid); the data gives grids {have}"
                )
            out.append(grid)
        return out

    def embed_label(self, text: str) -> torch.Tensor:
        ids = self._label_ids.get(text)
        if ids is None:
            ids = self._label_ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        weight = self.embeddings.weight
        return self.embeddings(torch.tensor(ids, device=weight.device)).mean(0)

    def __call__(self, output, batch, step: StepInfo) -> dict[str, torch.Tensor]:
        tokens = output.media_tokens.get(self.opts.modality)
        per_item = []
        if tokens is not None:
            n, M = tokens.shape[:2]
            if self.opts.labels == "open_clip":
                pixels = batch[self.batch_key].to(tokens.device)
                per_item = self.clip_labels(pixels, M, self.opts.seed + step.seed("sea-labels"))
            else:
                per_item = self.data_labels(batch, n, M)
        weigh_norm = self.opts.norm_weight > 0
        if step.processes == 1:
            if tokens is None:  # no media of this modality in the micro-batch
                return {}
            out = {"sea": sea_loss(tokens, per_item, self.embed_label, self.opts.temperature, self.opts.target_grad)}
            if weigh_norm:
                out["sea_norm"] = self.opts.norm_weight * norm_loss(tokens, per_item, self.embed_label)
            return out
        # several processes: the candidates are every process's labels, the mean is over every token
        # (collectives: called even by a process whose share has no media)
        classes = {lab for got in step.gather(sorted({lab for item in per_item for lab in item})) for lab in got}
        count = sum(map(len, per_item))
        if tokens is None:
            step.global_mean(torch.zeros(()), 0)
            if weigh_norm:
                step.global_mean(torch.zeros(()), 0)
            return {}
        loss = sea_loss(
            tokens, per_item, self.embed_label, self.opts.temperature, self.opts.target_grad, "sum", classes
        )
        out = {"sea": step.global_mean(loss, count)}
        if weigh_norm:
            norm = norm_loss(tokens, per_item, self.embed_label, "sum")
            out["sea_norm"] = self.opts.norm_weight * step.global_mean(norm, count)
        return out
