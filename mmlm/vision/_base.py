"""What every encoder exposes: ``hidden_size``, ``num_tokens``, ``preprocess`` and ``forward``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mmlm.images import to_rgb
from mmlm.vision.tiling import TilingOptions


class EncoderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # the encoder layers whose features go to the connector, by index (negative counts from the end: -1 is the
    # last block, -2 LLaVA's penultimate); several need the connector's ``fusion``, deepest first
    select_layers: list[int] = Field(default_factory=lambda: [-1])
    # dynamic high-resolution tiling (InternVL 2.5, NVLM-D tags): each image becomes a grid of
    # encoder-sized tiles plus a thumbnail; see mmlm/vision/tiling.py. null: one input per image
    tiling: TilingOptions | None = None


class ImageTransform:
    """PIL image -> normalised float tensor [3, H, W] at the size the encoder's weights expect."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], resample: str = "bicubic"):
        self.size = (int(size[0]), int(size[1]))  # (H, W)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[resample]

    def __call__(self, image: Image.Image, resize: str = "squash") -> torch.Tensor:
        """``resize`` (``processor.resize``): ``squash`` resizes ignoring the aspect ratio; ``pad``
        first centres the image on a canvas of the target aspect filled with the mean colour (LLaVA's
        expand2square, a square for a square input size); ``crop`` first keeps the largest centred box
        of the target aspect."""
        image = self.fit(to_rgb(image), resize)
        h, w = self.size
        if image.size != (w, h):
            image = image.resize((w, h), self.resample)
        arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (arr - self.mean) / self.std

    def fit(self, image: Image.Image, resize: str) -> Image.Image:
        """The image brought to the input size's aspect ratio by ``resize`` (unchanged for squash)."""
        if resize not in ("squash", "pad", "crop"):
            raise ValueError(f"resize {resize!r}: expected squash, pad or crop")
        h, w = self.size
        iw, ih = image.size
        if resize == "squash" or iw * h == ih * w:
            return image
        wider = iw * h > ih * w  # the image is wider than the target aspect
        if resize == "crop":
            cw, ch = (max(1, round(ih * w / h)), ih) if wider else (iw, max(1, round(iw * h / w)))
            left, top = (iw - cw) // 2, (ih - ch) // 2
            return image.crop((left, top, left + cw, top + ch))
        cw, ch = (iw, max(ih, round(iw * h / w))) if wider else (max(iw, round(ih * w / h)), ih)
        fill = tuple(min(255, max(0, round(m * 255))) for m in self.mean.flatten().tolist())
        canvas = Image.new("RGB", (cw, ch), fill)
        canvas.paste(image, ((cw - iw) // 2, (ch - ih) // 2))
        return canvas

    def describe(self) -> dict:
        return {"size": list(self.size), "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


class Encoder(nn.Module):
    """Base of every encoder. Subclasses set ``hidden_size``, ``num_tokens``, ``preprocess`` and
    implement ``forward(x) -> Tensor[B, N, D]`` (a list of them when several layers are selected)."""

    modality = "image"
    hidden_size: int
    num_tokens: int
    preprocess: ImageTransform

    def __init__(self, select_layers: Sequence[int] = (-1,)):
        super().__init__()
        if not select_layers:
            raise ValueError("select_layers must name at least one layer")
        if len({i < 0 for i in select_layers}) > 1:
            raise ValueError(f"select_layers {list(select_layers)}: use all negative or all non-negative indices")
        if len(set(select_layers)) != len(select_layers):
            raise ValueError(f"select_layers {list(select_layers)} repeats a layer")
        self.select_layers = list(select_layers)

    @property
    def multi_layer(self) -> bool:
        return len(self.select_layers) > 1

    def _measure(self, size: tuple[int, int]) -> None:
        """Learn N and D from one forward on a blank image (cheap, and exact for any backbone)."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 3, *size))
        self.train(was_training)
        layers = out if isinstance(out, list) else [out]
        self.layer_shapes = [(int(f.shape[1]), int(f.shape[2])) for f in layers]
        self.num_tokens, self.hidden_size = self.layer_shapes[0]

    @staticmethod
    def _check_layer(i: int, n: int) -> int:
        """``i`` as an index into ``n`` hidden states (0 = embeddings); out of range -> IndexError."""
        if not -n <= i < n:
            raise IndexError(
                f"select_layers: {i} is out of range; this model has {n} hidden states "
                f"(0 = embeddings, {n - 1} = last block)"
            )
        return i % n

    def _pick(self, layers: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        return layers if self.multi_layer else layers[0]


def local_file(path: str, key: str) -> Path:
    """A local weights file named by the config key ``key``; missing -> FileNotFoundError naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: no such file: {p}")
    return p


def nchw_to_nlc(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    return x
