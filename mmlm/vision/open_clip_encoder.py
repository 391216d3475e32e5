"""The image tower of an open_clip model: a built-in architecture or a custom config, from scratch
or with CLIP weights from a local file. Returns patch tokens only (the class token is dropped)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import ConfigDict, Field

from mmlm.registry import ENCODERS
from mmlm.vision._base import Encoder, EncoderOptions, ImageTransform, local_file, nchw_to_nlc

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenClipOptions(EncoderOptions):
    # ``model_config`` is pydantic's own class attribute, so the option lives under another field
    # name and is read from the ``model_config`` key through its alias (the only accepted spelling)
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    path_keys: ClassVar[dict[str, str]] = {"weights": "file"}
    model_name: str  # an open_clip architecture, e.g. ViT-B-32 (see open_clip.list_models())
    weights: str | None = None  # local file with a full open_clip (CLIP) state dict
    # a custom architecture {embed_dim, vision_cfg, text_cfg}, registered under model_name
    arch_config: dict[str, Any] | None = Field(None, alias="model_config")
    img_size: int | None = Field(None, gt=0)  # input side in pixels (force_image_size); default: the architecture's


def import_open_clip(needed_by: str = "model.encoders.*.type 'open_clip'"):
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(f"{needed_by} needs the open_clip package: pip install open-clip-torch") from err
    return open_clip


def _register_config(open_clip, name: str, cfg: dict[str, Any], where: str = "model.encoders.*") -> None:
    """Make ``name`` resolve to ``cfg`` through open_clip's own add_model_config (a JSON file whose
    stem is the model name). The entry stays in open_clip's table after the file is gone."""
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(
            f"{where}.model_config: missing key(s) {', '.join(missing)} "
            "(an open_clip config has embed_dim, vision_cfg and text_cfg)"
        )
    if "/" in name or name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"{where}.model_name: {name!r} cannot name a custom model_config")
    text = json.dumps(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(text)
        open_clip.add_model_config(path)
    if open_clip.get_model_config(name) != json.loads(text):
        raise RuntimeError(f"open_clip did not register model_config under {name!r}")


def create_open_clip(
    model_name: str,
    arch_config: dict[str, Any] | None,
    weights: str | None,
    where: str = "model.encoders.*",
    needed_by: str = "model.encoders.*.type 'open_clip'",
    **kwargs,
):
    """A whole open_clip model on the CPU in fp32: a built-in architecture, or ``arch_config``
    registered under ``model_name``; weights from a local file when given. ``where`` prefixes the
    config key paths in error messages."""
    open_clip = import_open_clip(needed_by)
    if arch_config is not None:
        _register_config(open_clip, model_name, copy.deepcopy(arch_config), where)
    elif model_name not in open_clip.list_models():
        raise ValueError(
            f"{where}.model_name: open_clip has no model {model_name!r} "
            "(see open_clip.list_models(), or give model_config)"
        )
    if weights is not None:
        kwargs["pretrained"] = str(local_file(weights, f"{where}.weights"))
    return open_clip.create_model(model_name, device="cpu", precision="fp32", **kwargs)


EXAMPLE = {
    "model_name": "mmlm-example-clip",
    "model_config": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    },
}  # a tiny working instance (contract tests)


@ENCODERS.register(
    "open_clip",
    options=OpenClipOptions,
    summary="the image tower of an open_clip model (built-in or custom config, local weights)",
    example=EXAMPLE,
)
class OpenClipEncoder(Encoder):
    def __init__(self, opts: OpenClipOptions, skeleton: bool = False):
        super().__init__(opts.select_layers)
        kwargs: dict[str, Any] = {}
        if opts.img_size is not None:
            kwargs["force_image_size"] = opts.img_size
        weights = None if skeleton else opts.weights  # a skeleton (meta device) reads no weights
        model = create_open_clip(opts.model_name, opts.arch_config, weights, **kwargs)
        self.visual = model.visual  # the text tower is dropped with ``model``
        if not hasattr(self.visual, "forward_intermediates"):
            raise ValueError(f"open_clip visual tower {type(self.visual).__name__} has no forward_intermediates")
        self.pretrained = opts.weights is not None
        size = self.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        mean = getattr(self.visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(self.visual, "image_std", None) or OPENAI_STD
        self.preprocess = ImageTransform(size, mean, std)
        self._measure(size)

    def forward(self, x: torch.Tensor):
        # open_clip returns the intermediates in block order; indices are all one sign (base class)
        order = sorted(self.select_layers)
        out = self.visual.forward_intermediates(x, indices=order, intermediates_only=True, output_fmt="NCHW")
        by_index = dict(zip(order, out["image_intermediates"], strict=False))
        return self._pick([nchw_to_nlc(by_index[i]) for i in self.select_layers])
