"""Reading images the way every path of mmlm needs them: a file is checked for its size before it
is decoded (``processor.max_image_pixels``), any failure is a ``SampleError`` that the bad-sample
policy can count, and every mode becomes 8-bit RGB without losing what the pixels mean: 16-bit and
32-bit integer images are rescaled from their range, float images from [0, 1] (or their own min-max
when outside it), and transparency is composited on white."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmlm.errors import SampleError

DEFAULT_MAX_PIXELS = 25_000_000  # 5000 x 5000; Pillow's own bomb limit is 89.5 M (an error at 2x)


def _rescaled(im: Image.Image) -> Image.Image:
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        lo, hi = (0.0, 1.0) if a.size and a.min() >= 0 and a.max() <= 1 else (float(a.min()), float(a.max()))
    elif im.mode.startswith("I;16") or (a.size and a.max() > 255 and a.max() <= 65535 and a.min() >= 0):
        lo, hi = 0.0, 65535.0
    elif a.size and a.min() >= 0 and a.max() <= 255:
        lo, hi = 0.0, 255.0
    else:
        lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB (see the module docstring)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("F", "I") or im.mode.startswith("I;16"):
        return _rescaled(im).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, check and decode an image file into RGB; every failure is a SampleError."""
    path = Path(path)
    try:
        return _decode(path, f"image {path}", max_pixels)
    except FileNotFoundError:
        raise SampleError(f"image not found: {path}", "missing image") from None


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "the image", setting: str = "max_image_pixels"
) -> Image.Image:
    """Check and decode an image held in memory (an upload, a data URL) into RGB, its pixel count
    read from the header before anything is decoded; every failure is a SampleError naming ``name``
    (and ``setting``, the limit's name, when it is too large)."""
    import io

    return _decode(io.BytesIO(data), name, max_pixels, setting)


def _decode(src, name: str, max_pixels: int, setting: str = "processor.max_image_pixels") -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise SampleError(
                        f"{name} is {w}x{h} = {w * h:,} pixels, over {setting}={max_pixels:,}",
                        "image too large",
                    )
                im.load()
                return to_rgb(im)
    except (SampleError, FileNotFoundError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SampleError(
            f"{name} is too large to decode safely ({setting}={max_pixels:,}): {err}", "image too large"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SampleError(f"{name} cannot be decoded: {err}", "corrupt image") from None
