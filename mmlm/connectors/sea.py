"""SEA: token-level semantic alignment, wrapped around any other connector.

During the stages that enable it, each visual token's connector output is pulled towards the LLM
input embedding of its word label (mean over the label's sub-word pieces) by an InfoNCE loss over
the distinct labels of the batch, and pushed away from the others. Labels come from the data (the
shapes world writes per-patch labels at several grid sizes) or, with ``labels: open_clip``, from a
frozen CLIP model as in the SEA paper: the image is cut into the g x g grid of the output tokens, each
cell is scored against ``word_list`` and one of its ``top_k`` words is drawn by similarity (or the
best one with ``sample: false``). At inference, and in stages that do not enable it, the output is
exactly the wrapped connector's.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from mmlm.connectors._base import Connector, ConnectorOptions, build, split_output
from mmlm.registry import CONNECTORS


class _Inner(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str

    def options(self) -> dict:
        return dict(self.model_extra or {})


class SEAOptions(ConnectorOptions):
    inner: dict[str, Any] = Field(default_factory=lambda: {"type": "mlp"})  # the wrapped connector
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(0.07, gt=0)
    label_key: str = "patch_labels"  # per-image annotation written by the data source
    stages: list[str] | None = None  # training stages where the loss is on (None: every stage)
    stage_weights: dict[str, float] | None = None  # per-stage weight, replacing ``weight`` there
    target_grad: bool = False  # let the loss move the LLM's word embeddings too
    # where the labels come from: the data (``label_key``) or a CLIP model scoring each patch
    labels: Literal["data", "open_clip"] = "data"
    word_list: list[str] | None = Field(None, validate_default=True)  # candidate labels (open_clip)
    # the scoring CLIP: {model_name, weights, model_config}, as for the open_clip encoder
    open_clip: dict[str, Any] | None = Field(None, validate_default=True)
    top_k: int = Field(3, gt=0)  # a label is drawn from each patch's top_k words ...
    label_temperature: float = Field(0.01, gt=0)  # ... by softmax(cosine / label_temperature)
    sample: bool = True  # False: always the best word
    seed: int = 0  # the draws are seeded with seed + the number of batches labelled so far

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
        if v is None:
            if info.data.get("labels") == "open_clip":
                raise ValueError("labels: open_clip needs open_clip: {model_name, weights[, model_config]} "
                                 "(the CLIP model that scores the patches)")
            return v
        try:
            spec = ClipScorerOptions.model_validate(v)
        except ValidationError as err:
            raise ValueError("; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in err.errors()
            )) from None
        return spec.model_dump(by_alias=True)


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
                raise ValueError(f"missing key(s) {', '.join(missing)} (an open_clip config has embed_dim, "
                                 "vision_cfg and text_cfg)")
        return v


def sea_loss(tokens: torch.Tensor, labels: list[list[str]], embed_label, temperature: float, target_grad: bool = False):
    """InfoNCE between token outputs ``[n, M, D]`` and the embeddings of their labels."""
    flat = [lab for per_image in labels for lab in per_image]
    uniq = sorted(set(flat))
    index = {lab: i for i, lab in enumerate(uniq)}
    targets = torch.stack([embed_label(lab) for lab in uniq]).to(tokens.dtype)
    if not target_grad:
        targets = targets.detach()
    t = F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1)
    e = F.normalize(targets.float(), dim=-1)
    logits = t @ e.T / temperature
    y = torch.tensor([index[lab] for lab in flat], device=tokens.device)
    return F.cross_entropy(logits, y)


_SCORE_CHUNK = 256  # patches per CLIP forward


class _ClipScorer:
    """A frozen open_clip model and the unit text embeddings of the word list. A plain object (no
    ``nn.Module``) so that neither the model nor the embeddings join the connector's parameters,
    buffers, state_dict or optimizer."""

    def __init__(self, spec: dict, words: list[str]):
        from mmlm.vision.open_clip_encoder import OPENAI_MEAN, OPENAI_STD, _import_open_clip, create_open_clip

        needed_by = "model.connectors.*.labels 'open_clip'"
        open_clip = _import_open_clip(needed_by)
        opts = ClipScorerOptions.model_validate(spec)
        model = create_open_clip(opts.model_name, opts.arch_config, opts.weights,
                                 where="model.connectors.*.open_clip", needed_by=needed_by)
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
                f"model.connectors.*.open_clip: the tokenizer of {opts.model_name!r} ({type(tokenizer).__name__}) "
                f"gives token id {int(ids.max())} but the text tower has only {vocab} tokens"
            )
        with torch.no_grad():
            self.text = F.normalize(model.encode_text(ids).float(), dim=-1)  # [W, E]

    def to(self, device: torch.device) -> "_ClipScorer":
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
                cell = x[:, :, rows[i]:rows[i + 1], cols[j]:cols[j + 1]]
                if tuple(cell.shape[-2:]) != self.size:
                    cell = F.interpolate(cell, size=self.size, mode="bicubic", align_corners=False,
                                         antialias=True).clamp(0, 1)
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
        feats = torch.cat([self.model.encode_image(flat[i:i + _SCORE_CHUNK]).float()
                           for i in range(0, flat.shape[0], _SCORE_CHUNK)])
        return (F.normalize(feats, dim=-1) @ self.text.T).view(B, M, -1)


class SEAConnector(Connector):
    def __init__(self, opts: SEAOptions, in_dim: int, out_dim: int, llm=None):
        super().__init__(in_dim, out_dim)
        self.opts = opts
        inner = _Inner.model_validate(opts.inner)
        if inner.type == "sea":
            raise ValueError("model.connectors.*.inner: SEA cannot wrap another SEA")
        self.inner = build(inner, in_dim, out_dim, llm=llm, where="model.connectors.*.inner")
        self._scorer_box: list[_ClipScorer] = []  # built at first use; a list keeps it out of the module tree
        self._label_calls = 0

    def _scorer(self) -> _ClipScorer:
        if not self._scorer_box:
            self._scorer_box.append(_ClipScorer(self.opts.open_clip, self.opts.word_list))
        return self._scorer_box[0]

    def clip_labels(self, pixels: torch.Tensor, preprocess: dict, num_tokens: int) -> list[list[str]]:
        """One word per output token and image, from the CLIP scores of the token's image cell."""
        g = math.isqrt(num_tokens)
        if g * g != num_tokens:
            raise ValueError(f"SEA labels: open_clip needs a square grid of tokens; the connector gives {num_tokens}")
        sims = self._scorer().similarity(pixels, preprocess, g).cpu()  # [B, M, W]
        words = self._scorer().words
        if self.opts.sample:
            gen = torch.Generator().manual_seed(self.opts.seed + self._label_calls)
            self._label_calls += 1
            top, idx = sims.topk(min(self.opts.top_k, sims.shape[-1]), dim=-1)
            probs = (top / self.opts.label_temperature).softmax(-1).flatten(0, 1)
            pick = torch.multinomial(probs, 1, generator=gen).view(idx.shape[:2] + (1,))
            chosen = idx.gather(-1, pick).squeeze(-1)
        else:
            chosen = sims.argmax(-1)
        return [[words[i] for i in row] for row in chosen.tolist()]

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.inner.num_output_tokens(num_input_tokens)

    def weight_for(self, stage: str | None) -> float:
        if self.opts.stage_weights and stage in self.opts.stage_weights:
            return self.opts.stage_weights[stage]
        return self.opts.weight

    def forward(self, feats, context: dict | None = None):
        tokens, aux = split_output(self.inner(feats, context=context))
        ctx = context or {}
        weight = self.weight_for(ctx.get("stage"))
        active = (
            self.training and ctx.get("training", False) and weight > 0
            and (self.opts.stages is None or ctx.get("stage") in self.opts.stages)
        )
        if not active:
            return (tokens, aux) if aux else tokens
        M = tokens.shape[1]
        if self.opts.labels == "open_clip":
            if ctx.get("pixels") is None or ctx.get("preprocess") is None:
                raise ValueError("SEA labels: open_clip needs the images in the connector context "
                                 "(context['pixels'] and context['preprocess'])")
            pixels = ctx["pixels"]
            if pixels.ndim != 4 or pixels.shape[0] != tokens.shape[0] or pixels.shape[1] != 3:
                raise ValueError(f"SEA labels: open_clip needs images [{tokens.shape[0]}, 3, H, W] for "
                                 f"{tokens.shape[0]} token sequences; got {list(pixels.shape)}")
            per_image = self.clip_labels(pixels.to(tokens.device), ctx["preprocess"], M)
        else:
            labels = (ctx.get("meta") or {}).get(self.opts.label_key)
            if not labels:
                return (tokens, aux) if aux else tokens
            g = int(math.isqrt(M))
            per_image = []
            for k, lab in enumerate(labels):
                grid = lab.get(str(g)) if isinstance(lab, dict) else lab
                if grid is None or len(grid) != M:
                    have = sorted(lab) if isinstance(lab, dict) else [len(lab)]
                    raise ValueError(
                        f"SEA: image {k} has no {self.opts.label_key} for {M} tokens (a {g}x{g} grid); "
                        f"the data gives grids {have}"
                    )
                per_image.append(grid)
        tok = ctx["tokenizer"]
        emb = ctx["llm"].get_input_embeddings()

        def embed_label(text: str) -> torch.Tensor:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return emb(torch.tensor(ids, device=tokens.device)).mean(0)

        loss = sea_loss(tokens, per_image, embed_label, self.opts.temperature, self.opts.target_grad)
        aux = {**aux, "sea": weight * loss}
        return tokens, aux


@CONNECTORS.register("sea", options=SEAOptions, summary="SEA token-level alignment around any connector (training only)")
def build_sea(opts: dict, in_dim: int, out_dim: int, llm=None) -> SEAConnector:
    return SEAConnector(SEAOptions(**opts), in_dim, out_dim, llm=llm)
