"""WebDataset tar shards, read as records with random access (``format: webdataset``).

A shard is a plain tar file in which a sample is the run of members sharing a key: the member name
up to its first dot after the last ``/`` (``00017.jpg``, ``00017.json``, ``00017.txt``), as
WebDataset and img2dataset write them. Of a sample:

- ``.json`` holding ``conversations`` or ``messages`` (LLaVA / ShareGPT / OpenAI turns) is the
  conversation, read as a LLaVA row (``mmlm/data/sources.py``: ``<image>`` placeholders, text-only
  samples, ``question``/``answer``);
- otherwise ``.txt`` (or a ``.json``'s ``caption``) is a caption: one ``<image>`` and the stage's
  ``caption_prompt``, answered by the caption (LLaVA's pre-training shape);
- its image members (``.jpg .jpeg .png .webp``, and ``.0.png``-style numbered ones, in name order)
  are its images.

The scan at stage start reads every member header and the small text members (conversations and
captions are needed to count tokens); images stay in the shard, referenced by (shard, offset,
size), and are read when a batch needs them. Records therefore have fixed positions, so a stage's
order, resume position and each process's share work exactly as for a JSON file.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mmlm.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_TEXT_LIMIT = 16 * 2**20  # a text member larger than this is not a conversation or caption


@dataclass(frozen=True)
class TarMember:
    """An image inside a shard: read on demand, never extracted."""

    shard: str
    name: str
    offset: int  # of the member's data in the shard
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self}: the shard ends {self.size - len(data)} bytes into this member")
        return data

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read())

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


def shard_files(path: Path) -> list[Path]:
    """A ``.tar`` file, or every ``.tar`` of a folder in name order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not found:
            raise DataError(f"{path}: no .tar shards in this folder")
        return found
    raise FileNotFoundError(f"no shard file or folder: {path}")


def _split(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: ``a/b/00017.0.png`` -> (``a/b/00017``, ``0.png``)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def scan_shard(shard: Path) -> list[tuple[str, dict[str, object]]]:
    """The samples of one shard in order: (key, {extension: text or TarMember})."""
    samples: list[tuple[str, dict[str, object]]] = []
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split(m.name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                parts = samples[-1][1]
                last = ext.rpartition(".")[2]
                if last in IMAGE_EXTENSIONS:
                    parts[ext] = TarMember(str(shard), m.name, m.offset_data, m.size)
                elif last in ("json", "txt") and m.size <= _TEXT_LIMIT:
                    raw = tar.extractfile(m).read()
                    try:
                        parts[ext] = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        parts[ext] = ValueError(f"{m.name} is not UTF-8 text")
    except tarfile.TarError as err:
        raise DataError(f"{shard}: not a readable tar shard: {err}") from None
    return samples


def image_members(parts: dict[str, object]) -> list[TarMember]:
    """A sample's images in name order (``jpg`` before ``0.png`` before ``1.png``)."""
    return [parts[e] for e in sorted(parts) if isinstance(parts[e], TarMember)]


def sample_row(parts: dict[str, object], caption_prompt: str) -> dict:
    """The LLaVA-shaped row a sample stands for (images left to the caller); raises ValueError when
    the sample has no conversation or caption to learn from."""
    for ext in ("json", "txt"):
        if isinstance(parts.get(ext), ValueError):
            raise parts[ext]
    meta = None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except json.JSONDecodeError as err:
            raise ValueError(f"its .json is not valid JSON: {err}") from None
        if isinstance(meta, dict) and ("conversations" in meta or "messages" in meta or "question" in meta):
            return meta
    caption = parts.get("txt")
    if caption is None and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    if caption is None or not str(caption).strip():
        raise ValueError("no conversation (.json with conversations or messages) and no caption (.txt)")
    row = {"conversations": [{"from": "human", "value": caption_prompt}, {"from": "gpt", "value": caption.strip()}]}
    if isinstance(meta, dict) and "id" in meta:
        row["id"] = meta["id"]
    return row
