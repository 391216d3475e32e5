"""Video as frames (Video-LLaMA): any registered image encoder runs on every frame, a learned
frame-position embedding (one vector per frame index; or, with ``frame_position: frame_token``, one
per frame index and token) is added to each frame's tokens, and the tokens of all frames go to the
connector as one sequence ``[items, frames * N, D]``, so a ``qformer`` connector is Video-LLaMA's
video Q-Former over all frames.

A video item is a list of frames (PIL images, or an array ``[T, H, W, 3]``), a folder of frame
images or a video file (PyAV: the ``video`` extra); ``num_frames`` of them are sampled uniformly
(``mmlm/video/read.py``) and each is brought to the image encoder's input by its own transform,
giving ``[frames, 3, H, W]``.

The frame-position table starts as a sinusoid table of std ``frame_position_std`` (deterministic, so
an encoder whose image encoder has pretrained weights is rebuilt identically from its source)."""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field, PrivateAttr, model_validator
from torch import nn

from mmlm.errors import ConfigError, SampleError
from mmlm.registry import ENCODERS
from mmlm.video.read import read_video, sample_indices
from mmlm.vision._base import Encoder, EncoderOptions
from mmlm.vision.tiling import TilingOptions


class FramesOptions(EncoderOptions):
    # the image encoder's file options, as for that encoder (timm/open_clip: weights; hf: path)
    path_keys: ClassVar[dict[str, str]] = {"image.weights": "file", "image.path": "local_or_hub"}
    # the image encoder run on every frame: any registered image encoder with its options, e.g.
    # {type: timm, model_name: test_convnext2, img_size: 64}; its select_layers pick the features
    image: dict[str, Any]
    # refused here: the image encoder's own select_layers pick the frames' features
    select_layers: list[int] = Field(default_factory=lambda: [-1])
    tiling: TilingOptions | None = None  # refused: a video's frames are not tiled
    num_frames: int = Field(8, ge=1)  # frames sampled uniformly from each video (the first and last included)
    # a learned position table added to the frames' tokens: frame is one vector per frame index (Video-LLaMA);
    # frame_token one per frame index and token (a joint space-time table, as in ViViT), so that pooling the
    # tokens of an object keeps which place it held at which time; none adds nothing
    frame_position: Literal["frame", "frame_token", "none"] = "frame"
    # the std of the frame-position table at init (a sinusoid table scaled to it): near the features' own
    # scale lets the order of frames be read from the start (Video-LLaMA's table starts at N(0, 1) beside
    # layer-normed features); a pretrained image encoder's features may want less
    frame_position_std: float = Field(0.02, gt=0)
    _image: BaseModel | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self):
        if self.tiling is not None:
            raise ConfigError("a video's frames are not tiled; tiling is for image encoders", "tiling")
        if "select_layers" in self.model_fields_set:
            raise ConfigError("set select_layers in 'image' (the layers of the frame encoder)", "select_layers")
        name = self.image.get("type")
        if not isinstance(name, str):
            raise ConfigError("required key is missing (an image encoder: timm, hf, open_clip)", "image.type")
        self._image = ENCODERS.parse(name, {k: v for k, v in self.image.items() if k != "type"}, "image")
        modality = getattr(ENCODERS.get(name).target, "modality", "image")
        if modality != "image":
            raise ConfigError(f"{name} is an encoder of {modality}; the frames need an image encoder", "image.type")
        if getattr(self._image, "tiling", None) is not None:
            raise ConfigError("a video's frames are not tiled", "image.tiling")
        return self


class VideoTransform:
    """A video (a list of frames, an array ``[T, H, W, 3]``, a folder of frames or a video file) ->
    ``[num_frames, 3, H, W]``: frames sampled uniformly, each through the image encoder's transform."""

    def __init__(self, frame_transform, num_frames: int):
        self.frame = frame_transform
        self.num_frames = num_frames

    @property
    def size(self) -> tuple[int, int]:
        return self.frame.size

    def __call__(self, item, resize: str = "squash") -> torch.Tensor:
        if isinstance(item, (str, os.PathLike)):
            frames = read_video(item, self.num_frames)
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            frames = [Image.fromarray(np.ascontiguousarray(f).astype(np.uint8)) for f in item]
        elif isinstance(item, (list, tuple)) and all(isinstance(f, Image.Image) for f in item):
            frames = list(item)
        else:
            raise SampleError(
                f"a video item is {type(item).__name__}; give a list of PIL frames, an array [T, H, W, 3], "
                "a folder of frame images or a video file",
                "unsupported format",
            )
        if not frames:
            raise SampleError("a video item has no frames", "no frames")
        picked = [frames[i] for i in sample_indices(len(frames), self.num_frames)]
        return torch.stack([self.frame(f, resize=resize) for f in picked])

    def describe(self) -> dict:
        return {"num_frames": self.num_frames, **self.frame.describe()}


def sinusoid_table(n: int, d: int, std: float = 0.02) -> torch.Tensor:
    """Transformer sinusoids ``[n, d]`` scaled to ``std``: a fixed, distinct start for each index."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / max(d, 1)))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return table * (std / table.std().clamp(min=1e-12))


EXAMPLE = {
    "image": {
        "type": "timm",
        "model_name": "vit_tiny_patch16_224",
        "img_size": 32,
        "kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
    },
    "num_frames": 3,
}  # a tiny working instance (contract tests)


@ENCODERS.register(
    "frames",
    options=FramesOptions,
    summary="video: an image encoder on every frame plus a learned frame-position embedding (Video-LLaMA)",
    example=EXAMPLE,
)
class FramesEncoder(Encoder):
    modality = "video"

    def __init__(self, opts: FramesOptions, skeleton: bool = False):
        name = opts.image["type"]
        parsed = opts._image or ENCODERS.parse(name, {k: v for k, v in opts.image.items() if k != "type"}, "image")
        try:
            image = ENCODERS.get(name).target(parsed, **({"skeleton": True} if skeleton else {}))
        except (ValueError, RuntimeError) as err:  # reported at model.encoders.<video>.image
            raise ValueError(f"model.encoders.*.image: {err}") from None
        super().__init__(image.select_layers)
        self.image = image
        self.num_frames = opts.num_frames
        self.pretrained = getattr(image, "pretrained", False)
        shapes = getattr(image, "layer_shapes", [(image.num_tokens, image.hidden_size)])
        self.tokens_per_frame = [n for n, _ in shapes]
        self.layer_shapes = [(opts.num_frames * n, d) for n, d in shapes]
        self.num_tokens, self.hidden_size = self.layer_shapes[0]
        self.frame_pos = None
        if opts.frame_position != "none":
            F, std = opts.num_frames, opts.frame_position_std
            tables = [
                sinusoid_table(F, d, std)[:, None, :]
                if opts.frame_position == "frame"
                else sinusoid_table(F * n, d, std).view(F, n, d)
                for n, d in shapes
            ]
            self.frame_pos = nn.ParameterList([nn.Parameter(t) for t in tables])
        self.preprocess = VideoTransform(image.preprocess, opts.num_frames)

    def forward(self, x: torch.Tensor):
        if x.ndim != 5 or x.shape[1] != self.num_frames:
            raise ValueError(f"a video batch is [items, {self.num_frames}, 3, H, W]; got {list(x.shape)}")
        B, F = x.shape[:2]
        out = self.image(x.flatten(0, 1))
        layers = out if isinstance(out, list) else [out]
        result = []
        for k, f in enumerate(layers):
            f = f.reshape(B, F, f.shape[1], f.shape[2])
            if self.frame_pos is not None:
                f = f + self.frame_pos[k][None].to(f.dtype)
            result.append(f.reshape(B, F * f.shape[2], f.shape[3]))
        return self._pick(result)
