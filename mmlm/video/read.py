"""The frames of a video, sampled uniformly to a fixed count: a folder of frame images (read in
natural name order: ``frame_2.png`` before ``frame_10.png``) or a video file decoded with PyAV (the
``video`` extra: ``pip install 'mmlm[video]'``). Every failure is a ``SampleError`` that the
bad-sample policy can count: a missing path, a folder without frame images, a file that cannot be
decoded or has no frames, a frame over ``processor.max_image_pixels``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

from mmlm.errors import SampleError
from mmlm.images import DEFAULT_MAX_PIXELS, load_image, to_rgb

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
EXTRA_HINT = "pip install 'mmlm[video]'"


def sample_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread uniformly over ``total`` frames, the first and the last included
    (so a change partway through a clip is seen before and after); with fewer frames than ``n``,
    every frame once and then the last one repeated."""
    if total <= 0 or n <= 0:
        raise ValueError(f"cannot sample {n} of {total} frames")
    if total <= n:
        return [*range(total), *[total - 1] * (n - total)]
    if n == 1:
        return [(total - 1) // 2]
    return [int(i * (total - 1) / (n - 1) + 0.5) for i in range(n)]


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The frame images of a folder, in natural name order (hidden files left out)."""
    files = [p for p in Path(folder).iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: _natural(p.name))


def check_video(path: str | os.PathLike) -> Path:
    """What can be known of a video without decoding it: it exists, and a folder holds frame images."""
    p = Path(path)
    if p.is_dir():
        if not frame_files(p):
            raise SampleError(f"video {p} is a folder with no frame images ({', '.join(FRAME_SUFFIXES)})", "no frames")
        return p
    if not p.is_file():
        raise SampleError(f"video not found: {p}", "missing video")
    return p


def read_video(path: str | os.PathLike, num_frames: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """``num_frames`` RGB frames of a folder of frame images or a video file, sampled uniformly
    (``sample_indices``)."""
    p = check_video(path)
    if p.is_dir():
        files = frame_files(p)
        picked: dict[int, Image.Image] = {}
        for i in sorted(set(sample_indices(len(files), num_frames))):
            picked[i] = load_image(files[i], max_pixels)
        return [picked[i] for i in sample_indices(len(files), num_frames)]
    return _read_file(p, num_frames, max_pixels)


def _read_file(p: Path, num_frames: int, max_pixels: int) -> list[Image.Image]:
    try:
        import av
    except ImportError:
        raise SampleError(
            f"reading the video file {p} needs PyAV: {EXTRA_HINT} (or give a folder of frame images)",
            "missing dependency",
        ) from None
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise SampleError(f"video {p} has no video stream", "no frames")
            total = int(container.streams.video[0].frames or 0)  # from the header; 0 when it does not say
        if total <= 0:
            total, _ = _decode(av, p, set(), max_pixels)
        if total <= 0:
            raise SampleError(f"video {p} has no frames", "no frames")
        want = sample_indices(total, num_frames)
        count, got = _decode(av, p, set(want), max_pixels)
        if count != total:  # the header's frame count was wrong: sample again over the frames there are
            if count <= 0:
                raise SampleError(f"video {p} has no frames", "no frames")
            want = sample_indices(count, num_frames)
            count, got = _decode(av, p, set(want), max_pixels)
    except SampleError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
        raise SampleError(f"video {p} cannot be decoded: {' '.join(str(err).split())}", "corrupt video") from None
    return [got[i] for i in want]


def _decode(av, p: Path, keep: set[int], max_pixels: int) -> tuple[int, dict[int, Image.Image]]:
    """Decode every frame of the first video stream; returns the count and the frames at ``keep``."""
    got: dict[int, Image.Image] = {}
    count = 0
    with av.open(str(p)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if count in keep:
                if frame.width * frame.height > max_pixels:
                    raise SampleError(
                        f"video {p} has {frame.width}x{frame.height} frames, over "
                        f"processor.max_image_pixels={max_pixels:,}",
                        "image too large",
                    )
                got[count] = to_rgb(frame.to_image())
            count += 1
    return count, got
