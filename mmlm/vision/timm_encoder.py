"""Any timm model as a vision encoder: from scratch, or with weights from a local file."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from pydantic import Field

from mmlm.registry import ENCODERS
from mmlm.vision._base import Encoder, EncoderOptions, ImageTransform, local_file, nchw_to_nlc


class TimmOptions(EncoderOptions):
    # options that name files or folders: relative ones are read from the config file's folder
    path_keys: ClassVar[dict[str, str]] = {"weights": "file"}
    model_name: str  # a timm architecture, e.g. vit_base_patch16_224 (see timm.list_models())
    weights: str | None = None  # local .safetensors/.bin/.pth file with the model's weights
    # input side in pixels (square), passed to timm.create_model (convolutional nets take any size);
    # default: the model's pretrained input size
    img_size: int | None = Field(None, gt=0)
    # more timm.create_model arguments, e.g. {depth: 4, embed_dim: 128, patch_size: 8}
    kwargs: dict[str, Any] = Field(default_factory=dict)
    mean: list[float] | None = None  # per-channel RGB mean of pixels in [0, 1]; default: the model's timm data config
    std: list[float] | None = None  # per-channel RGB std, divides (pixel - mean); default: the model's timm data config
    # learned absolute position embedding added to the output tokens: gives a convolutional
    # backbone's tokens an identity of place (ViTs have their own)
    pos_embed: bool = False


EXAMPLE = {
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
}  # a tiny working instance (contract tests)


@ENCODERS.register(
    "timm", options=TimmOptions, summary="any timm model (from scratch or a local weights file)", example=EXAMPLE
)
class TimmEncoder(Encoder):
    def __init__(self, opts: TimmOptions, skeleton: bool = False):
        super().__init__(opts.select_layers)
        import timm
        from timm.data import resolve_data_config

        kwargs = dict(opts.kwargs)
        if opts.img_size is not None:
            kwargs["img_size"] = opts.img_size
        if opts.weights is not None and not skeleton:  # a skeleton (meta device) reads no weights
            path = local_file(opts.weights, "model.encoders.*.weights")
            kwargs["pretrained"] = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(path), "num_classes": 0}
        try:
            try:
                self.backbone = timm.create_model(opts.model_name, num_classes=0, **kwargs)
            except TypeError as err:
                if "img_size" not in str(err):
                    raise
                kwargs.pop("img_size")  # convolutional nets take any input size
                self.backbone = timm.create_model(opts.model_name, num_classes=0, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"timm has no model {opts.model_name!r} (see timm.list_models())") from None
            raise
        self.pretrained = opts.weights is not None
        data_cfg = resolve_data_config({}, model=self.backbone)
        size = (opts.img_size, opts.img_size) if opts.img_size else tuple(data_cfg["input_size"][1:])
        self.preprocess = ImageTransform(size, opts.mean or data_cfg["mean"], opts.std or data_cfg["std"])
        self._measure(size)
        self.pos = None
        if opts.pos_embed:
            self.pos = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.randn(n, d) * 0.02) for n, d in self.layer_shapes]
            )

    def forward(self, x: torch.Tensor):
        out = self._features(x)
        if getattr(self, "pos", None) is None:
            return out
        if isinstance(out, list):
            return [f + p for f, p in zip(out, self.pos, strict=False)]
        return out + self.pos[0]

    def _features(self, x: torch.Tensor):
        bb = self.backbone
        if hasattr(bb, "forward_intermediates"):
            order = sorted(self.select_layers)  # timm returns layers in ascending order
            # stop_early: the blocks after the deepest selected one are not run (their output is unused)
            early = (
                {"stop_early": True} if "stop_early" in inspect.signature(bb.forward_intermediates).parameters else {}
            )
            feats = bb.forward_intermediates(x, indices=order, intermediates_only=True, output_fmt="NCHW", **early)
            by_index = dict(zip(order, feats, strict=False))
            return self._pick([nchw_to_nlc(by_index[i]) for i in self.select_layers])
        if self.multi_layer:
            raise ValueError(f"timm model {type(bb).__name__} cannot return intermediate layers")
        f = bb.forward_features(x)
        if f.ndim == 3:
            f = f[:, getattr(bb, "num_prefix_tokens", 0) :]
        return nchw_to_nlc(f)
