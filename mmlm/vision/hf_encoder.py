"""Any Hugging Face vision model as an encoder: a hub id or local directory (``path``), or a
config built from scratch (``config``). Features are entries of ``hidden_states`` (0 = embeddings,
so -2 is the penultimate block, LLaVA's choice), with CLS/register tokens dropped by default.

Blocks after the deepest selected one are not run: with LLaVA's ``-2`` the last block of the tower
(and its post-norm's input) would be computed and thrown away at every image, as transformers'
Llava does. The model's block list is cut for the duration of each forward (its weights stay in
the model and the checkpoint, so loading and exporting see the whole tower)."""

from __future__ import annotations

import contextlib
import inspect
import json
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from mmlm.registry import ENCODERS
from mmlm.vision._base import Encoder, EncoderOptions, ImageTransform, nchw_to_nlc

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


class HFEncoderOptions(EncoderOptions):
    path_keys: ClassVar[dict[str, str]] = {"path": "local_or_hub"}
    path: str | None = None  # hub id or local directory (from_pretrained)
    config: dict[str, Any] | None = None  # {model_type: ..., **config fields}, built from scratch
    drop_prefix_tokens: bool = True  # drop CLS / register / distillation tokens
    # input side in pixels (square); default: preprocessor_config.json's size, else the model config's;
    # pretrained weights at another size get interpolated position embeddings where the model allows it
    image_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.config is None):
            which = "both were given" if self.path is not None else "neither was given"
            raise ValueError(
                f"give exactly one of 'path' (hub id or local directory) or 'config' (a dict with model_type); {which}"
            )
        if self.config is not None and not self.config.get("model_type"):
            raise ValueError("'config' needs a 'model_type' (e.g. clip_vision_model, siglip_vision_model)")
        return self


def _as_hw(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return (int(size["height"]), int(size["width"]))
        edge = size.get("shortest_edge") or size.get("longest_edge")
        return (int(edge), int(edge)) if edge else None
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    return None


def _block_list(model: torch.nn.Module, depth: int | None) -> tuple[torch.nn.Module, str] | None:
    """``(parent, attribute)`` of the model's list of ``depth`` transformer blocks, if it has one."""
    if not depth:
        return None
    for module in model.modules():
        for attr, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == depth and attr in ("layers", "layer", "blocks"):
                return module, attr
    return None


def _read_preprocessor(path: str) -> dict[str, Any] | None:
    """The preprocessor_config.json next to the weights (local directory or hub cache), if any."""
    from transformers.utils import cached_file

    try:
        file = cached_file(
            path,
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None
    if file is None:
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


EXAMPLE = {
    "config": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
}  # a tiny working instance (contract tests)


@ENCODERS.register(
    "hf",
    options=HFEncoderOptions,
    summary="any Hugging Face vision model (hub id, local directory or config from scratch)",
    example=EXAMPLE,
)
class HFEncoder(Encoder):
    def __init__(self, opts: HFEncoderOptions, skeleton: bool = False):
        super().__init__(opts.select_layers)
        from transformers import AutoConfig, AutoModel

        if opts.path is not None and skeleton:  # its config only, parameters on the meta device
            model = AutoModel.from_config(AutoConfig.from_pretrained(opts.path), dtype=torch.float32)
        elif opts.path is not None:
            model = AutoModel.from_pretrained(opts.path, dtype=torch.float32)
        else:
            fields = dict(opts.config)
            model_type = fields.pop("model_type")
            try:
                conf = AutoConfig.for_model(model_type, **fields)
            except ValueError as err:
                raise ValueError(f"model.encoders.*.config.model_type: {err}") from None
            vconf = getattr(conf, "vision_config", conf)
            if opts.image_size is not None and hasattr(vconf, "image_size"):
                vconf.image_size = opts.image_size
            model = AutoModel.from_config(conf, dtype=torch.float32)
        vconf = getattr(model.config, "vision_config", model.config)
        # a full dual-tower model (CLIPModel, SiglipModel, ...): keep the vision tower only
        if hasattr(model, "vision_model") and hasattr(model, "text_model"):
            model = model.vision_model
        self.model = model
        self.pretrained = opts.path is not None
        self.drop_prefix_tokens = opts.drop_prefix_tokens
        patch = getattr(vconf, "patch_size", None)
        self.patch_hw = _as_hw(patch) if patch is not None else None

        pp = _read_preprocessor(opts.path) if opts.path is not None else None
        mean, std, size, resample = CLIP_MEAN, CLIP_STD, None, "bicubic"
        if pp:
            mean = pp.get("image_mean") or mean
            std = pp.get("image_std") or std
            if pp.get("do_center_crop") and pp.get("crop_size"):
                size = _as_hw(pp["crop_size"])
            size = size or _as_hw(pp.get("size"))
            resample = _RESAMPLE.get(pp.get("resample"), resample)
        native = _as_hw(getattr(vconf, "image_size", None))
        if opts.image_size is not None:
            size = (opts.image_size, opts.image_size)
        size = size or native
        if size is None:
            raise ValueError("model.encoders.*.image_size: the model config names no image_size; set image_size")
        # weights trained at another resolution: interpolate position embeddings where the model can
        self._fwd_kwargs: dict[str, Any] = {}
        if native is not None and size != native:
            if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
                self._fwd_kwargs["interpolate_pos_encoding"] = True
        self.preprocess = ImageTransform(size, mean, std, resample)
        # the first forward (in _measure) runs every block and counts the hidden states; when they are
        # the embeddings plus one per block of the list found here, later forwards stop at the deepest
        # selected block
        self._blocks = _block_list(model, getattr(vconf, "num_hidden_layers", None))
        self._n_hidden: int | None = None
        self._run_blocks: int | None = None
        self._measure(size)
        if self._blocks is not None and self._n_hidden == len(getattr(*self._blocks)) + 1:
            deepest = max(i % self._n_hidden for i in self.select_layers)
            if 0 < deepest < self._n_hidden - 1:
                self._run_blocks = deepest
                self._check_cut(size)

    def _check_cut(self, size: tuple[int, int]) -> None:
        """Keep the cut only if it gives the whole tower's features on a random image (a model whose
        blocks are not run in list order, or whose hidden states are gathered otherwise, runs whole)."""
        if next(self.model.parameters()).is_meta:
            return
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                cut = self.forward(x)
                run, self._run_blocks = self._run_blocks, None
                whole = self.forward(x)
        except (IndexError, RuntimeError):
            return
        finally:
            self.train(was_training)
        cut, whole = (v if isinstance(v, list) else [v] for v in (cut, whole))
        if all(a.shape == b.shape and torch.allclose(a, b, atol=1e-5) for a, b in zip(cut, whole, strict=True)):
            self._run_blocks = run

    @contextlib.contextmanager
    def _needed_blocks(self):
        """The model's block list cut to the blocks the selected layers need, for one forward."""
        if self._run_blocks is None:
            yield
            return
        parent, attr = self._blocks
        blocks = getattr(parent, attr)
        setattr(parent, attr, torch.nn.ModuleList(list(blocks)[: self._run_blocks]))
        try:
            yield
        finally:
            setattr(parent, attr, blocks)

    def forward(self, x: torch.Tensor):
        with self._needed_blocks():
            hidden = self.model(pixel_values=x, output_hidden_states=True, **self._fwd_kwargs).hidden_states
        n = self._n_hidden = self._n_hidden or len(hidden)  # the whole tower's count, from the first forward
        out = []
        for i in self.select_layers:
            h = hidden[self._check_layer(i, n)]
            if h.ndim == 4:  # convolutional stages: [B, C, H, W]
                h = nchw_to_nlc(h)
            elif self.drop_prefix_tokens:
                if self.patch_hw is None:
                    raise ValueError(
                        "drop_prefix_tokens needs the config's patch_size; set drop_prefix_tokens: false for this model"
                    )
                grid = (x.shape[-2] // self.patch_hw[0]) * (x.shape[-1] // self.patch_hw[1])
                prefix = h.shape[1] - grid  # CLS + registers; negative for downsampled stages (Swin)
                if prefix > 0:
                    h = h[:, prefix:]
            out.append(h)
        return self._pick(out)
