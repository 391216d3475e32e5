"""A stage's samples: records checked up front against the processor (lengths, media counts,
image paths), with an ``on_bad_sample`` policy: ``error`` stops at the first bad sample naming its
index and source, ``skip`` drops it and counts why. Pairs records (``mmlm/data/pairs.py``) are
checked and encoded as embedding prompts with ``embedding`` (the model's ``model.embedding``)."""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from mmlm.data import check_cache
from mmlm.data.pairs import PairEncoded, PairRecord, check_pair, collate_pairs, load_pair
from mmlm.data.records import Record, resolve_image
from mmlm.data.shards import TarMember
from mmlm.errors import SampleError
from mmlm.images import decode_image, load_image, to_rgb
from mmlm.modalities import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from mmlm.processor import Encoded, Processor
from mmlm.video.read import check_video, read_video

log = logging.getLogger(__name__)


class StageDataset:
    def __init__(
        self,
        records: Sequence[Record],
        processor: Processor,
        policy: str = "error",
        name: str = "data",
        embedding=None,  # the model's EmbeddingConfig: how pairs records are written (needed for them only)
        cache: bool = False,  # reuse (and save) the check's results: mmlm/data/check_cache.py
        workers: int = 1,  # processes that check the records (forked; large data sets only)
    ):
        self.processor = processor
        self.embedding = embedding
        self.policy = policy
        self.name = name
        self.skipped: Counter = Counter()  # samples refused up front, by reason
        self.failed: dict[int, str] = {}  # samples that failed when loaded (corrupt image ...): index -> reason
        self.records: list[Record] = []
        self.paths: list[list] = []
        self.lengths: list[int | None] = []  # each kept sample's tokens, media included (None: pairs)
        key = check_cache.fingerprint(records, processor) if cache else None
        cached = check_cache.load(key, len(records))
        fresh = cached is None
        if fresh and _parallel(records, workers):
            cached = _check_in_processes(self, records, workers)
        results: list = []
        for i, rec in enumerate(records):
            try:
                if cached is not None:
                    paths, n = self._recall(rec, cached[i])
                else:
                    paths, n = self._check(rec, i)
                    results.append(n)
                self.paths.append(paths)
                self.lengths.append(n)
                self.records.append(rec)
            except SampleError as err:
                if cached is None:
                    results.append([err.reason, err.detail])
                self._bad(err, i, rec)
        if key is not None and fresh:
            check_cache.save(key, cached if cached is not None else results)

    @staticmethod
    def _recall(rec: Record, result) -> tuple[list, int | None]:
        """A record's media and length from a saved check (``check_cache``); a saved refusal is raised."""
        if isinstance(result, list):
            raise SampleError(result[1], result[0])
        # checked when the result was saved (inside the root): joined to the root without a syscall each
        paths = [_under(rec.image_root, img) if isinstance(img, str) else img for img in rec.images]
        return paths, result

    def _bad(self, err: SampleError, i: int, rec: Record) -> None:
        if self.policy == "error":
            raise SampleError(err.detail, err.reason, i, where=self.where(rec, i)) from None
        self.skipped[err.reason] += 1
        log.debug("skipped %s: %s", self.where(rec, i), err.detail)

    def where(self, rec: Record, i: int) -> str:
        """A sample as its user finds it: the file and its row there, or its line for line-numbered
        rows (``pairs.jsonl:7``), or the stage's index when the record came from no file."""
        if rec.source and rec.info.get("line") is not None:
            line = rec.info["line"]
            return f"{rec.source}:{line}" + (f" (id {rec.id})" if rec.id != str(line) else "")
        if rec.source and rec.row is not None:
            return f"{rec.source}: sample {rec.row} (id {rec.id})"
        return f"{rec.source or self.name}: sample {i} (id {rec.id})"

    def _check(self, rec: Record, i: int) -> tuple[list, int | None]:
        if "error" in rec.info:
            raise rec.info["error"]
        if isinstance(rec, PairRecord):
            if self.embedding is None:
                raise ValueError(f"{self.name}: pairs records need the model's embedding config (embedding=)")
            return check_pair(rec, self.processor, self.embedding), None
        paths = []
        for img in rec.images:
            if isinstance(img, str):
                p = resolve_image(rec.image_root, img)
                if not p.is_file():
                    raise SampleError(f"image not found: {p}", "missing image")
                paths.append(p)
            elif isinstance(img, (Image.Image, TarMember)):  # in memory, or in a shard (read when drawn)
                paths.append(img)
            else:  # found now, not when training draws it
                raise SampleError(
                    f"an image is {type(img).__name__}; only file paths and PIL images are read", "unsupported format"
                )
        n_ph = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in rec.messages)
        if n_ph != len(rec.images):
            raise SampleError(
                f"{n_ph} {IMAGE_PLACEHOLDER} placeholders but {len(rec.images)} images", "media count mismatch"
            )
        for name, placeholder, files, noun in (
            ("audio", AUDIO_PLACEHOLDER, rec.audios, "audio files"),
            ("video", VIDEO_PLACEHOLDER, rec.videos, "videos"),
        ):
            n_ph = sum(m["content"].count(placeholder) for m in rec.messages)
            if n_ph != len(files):
                raise SampleError(f"{n_ph} {placeholder} placeholders but {len(files)} {noun}", "media count mismatch")
            if files and name not in self.processor.media:
                raise SampleError(f"the sample has {name} but the model has no {name} encoder", "bad media")
        for a in rec.audios:
            p = resolve_image(rec.image_root, a)
            if not p.is_file():
                raise SampleError(f"audio not found: {p}", "missing audio")
        for v in rec.videos:  # a folder must hold frames; a file is decoded when the sample is loaded
            check_video(resolve_image(rec.image_root, v))
        if not any(m["role"] == "assistant" for m in rec.messages):
            raise SampleError("no assistant turn to learn from", "no target")
        sizes = None
        if self.processor.media.get("image") is not None and self.processor.media["image"].tiling is not None:
            sizes = {"image": [_image_size(p) for p in paths]}  # tiles depend on the size: read the headers
        n = self.processor.count_tokens(rec.messages, sizes)
        if n > self.processor.config.max_length:
            raise SampleError(
                f"{n} tokens (media tokens included) exceed processor.max_length={self.processor.config.max_length}; "
                "rejected, not truncated",
                "too long",
            )
        return paths, n

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> Encoded:
        """Encode sample ``i``; raises SampleError for a sample that turns out bad (corrupt image)."""
        rec = self.records[i]
        if isinstance(rec, PairRecord):
            return load_pair(self.paths[i], self.processor, self.embedding.chat_template, i)
        return self.processor.encode(rec.messages, self.media(i) or None, index=i, meta=rec.meta)

    def media(self, i: int) -> dict[str, list]:
        """Sample ``i``'s media by modality, decoded: images, audio clips as waveforms, and videos as
        their sampled frames."""
        rec = self.records[i]
        images = self.images(i)
        media = {"image": images} if images else {}
        if rec.audios:
            from mmlm.audio.whisper_encoder import read_audio

            rate = self.processor.media["audio"].transform.sampling_rate
            media["audio"] = [read_audio(resolve_image(rec.image_root, a), rate) for a in rec.audios]
        if rec.videos:
            n, limit = self.processor.media["video"].transform.num_frames, self.processor.config.max_image_pixels
            media["video"] = [read_video(resolve_image(rec.image_root, v), n, limit) for v in rec.videos]
        return media

    def collate(self, samples: list, pack_tokens: int | None = None) -> dict:
        """A micro-batch of loaded samples: the processor's batch (``pack_tokens``: packed into rows
        of that many tokens), or for pairs its ``query`` and ``candidate`` sub-batches (``collate_pairs``)."""
        if samples and isinstance(samples[0], PairEncoded):
            return collate_pairs(self.processor, samples)
        if pack_tokens is not None:
            return self.processor.collate_packed(samples, pack_tokens)
        return self.processor.collate(samples)

    def images(self, i: int) -> list:
        """Sample ``i``'s images, decoded (files, shard members) or as given (in-memory images)."""
        limit = self.processor.config.max_image_pixels
        return [_decoded(p, limit) for p in self.paths[i]]

    def report(self) -> dict:
        """Samples used and skipped, each bad sample counted once whatever number of times it was drawn."""
        by_reason = Counter(self.skipped)
        by_reason.update(self.failed.values())
        return {
            "used": len(self.records) - len(self.failed),
            "skipped": sum(by_reason.values()),
            "skipped_by_reason": dict(by_reason),
        }


_PARALLEL_MIN = 4000  # records below which forking workers costs more than it saves
_WORK: dict = {}  # what forked check workers read: the dataset being built and its records


def _parallel(records: Sequence, workers: int) -> bool:
    import multiprocessing

    return (
        workers > 1
        and len(records) >= _PARALLEL_MIN
        and "fork" in multiprocessing.get_all_start_methods()
        and all(isinstance(r, Record) and all(isinstance(m, str) for m in r.images) for r in records)
    )


def _check_chunk(bounds: tuple[int, int]) -> list:
    ds, records = _WORK["dataset"], _WORK["records"]
    out: list = []
    for i in range(*bounds):
        try:
            out.append(ds._check(records[i], i)[1])
        except SampleError as err:
            out.append([err.reason, err.detail])
    return out


def _check_in_processes(ds: StageDataset, records: Sequence, workers: int) -> list:
    """Every record's check result (its length, or [reason, detail]) from ``workers`` forked
    processes, in record order; they share the parent's records and processor by fork."""
    import multiprocessing

    n = len(records)
    step = max(1, -(-n // (workers * 8)))
    chunks = [(a, min(n, a + step)) for a in range(0, n, step)]
    _WORK.update(dataset=ds, records=records)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_check_chunk, chunks)
    finally:
        _WORK.clear()
    return [r for part in parts for r in part]


@functools.lru_cache(maxsize=64)
def _resolved_root(root: Path) -> str:
    return str(root.resolve())


def _under(root: Path | None, rel: str) -> Path:
    if root is None:  # saved as refused, so not reached; kept for a clear error
        return resolve_image(root, rel)
    return Path(os.path.normpath(os.path.join(_resolved_root(Path(root)), rel)))


def _decoded(image, limit: int) -> Image.Image:
    if isinstance(image, Path):
        return load_image(image, limit)
    if isinstance(image, TarMember):
        try:
            data = image.read()
        except OSError as err:
            raise SampleError(f"image {image} cannot be read: {err}", "corrupt image") from None
        return decode_image(data, limit, name=f"image {image}", setting="processor.max_image_pixels")
    return to_rgb(image)


def _image_size(image) -> tuple[int, int]:
    """(width, height) from a PIL image or a file's header (nothing decoded)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    try:
        with Image.open(image.open() if isinstance(image, TarMember) else image) as im:
            return im.size
    except (OSError, ValueError) as err:
        raise SampleError(f"image {image} cannot be read: {err}", "corrupt image") from None
