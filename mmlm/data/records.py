"""The record every reader produces, and image path checks."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from mmlm.errors import SampleError
from mmlm.modalities import IMAGE_PLACEHOLDER, MODALITIES

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Record:
    id: str
    messages: list[dict]  # [{"role": "user"|"assistant"|"system", "content": str}]
    images: list[Any] = field(default_factory=list)  # relative paths (str) or PIL images
    image_root: Path | None = None
    meta: dict[str, list[Any]] = field(default_factory=dict)  # per-image annotations (patch labels)
    info: dict[str, Any] = field(default_factory=dict)  # per-sample extras (question types, answers)
    source: str = ""
    row: int | None = None  # its index in ``source`` (the stage's index can differ: several sources, weights)
    audios: list[Any] = field(default_factory=list)  # sound files (relative paths, read under image_root)
    videos: list[Any] = field(default_factory=list)  # frame folders or video files (relative, under image_root)

    def texts(self) -> list[str]:
        """Every text this record can feed the LLM: the messages (media placeholders removed) and the
        words of its per-item annotations (e.g. per-patch labels). A from-scratch tokenizer is fitted
        on these, so nothing a stage reads is out of its vocabulary."""
        out = []
        for m in self.messages:
            text = m["content"]
            for mod in MODALITIES.values():
                text = text.replace(mod.placeholder, " ")
            out.append(text)
        out.extend(_strings(self.meta))
        return out


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|data:)", re.IGNORECASE)  # a URL or a data URL, not a path
REMOTE_REFUSED = "remote/inline images are not read; download them and give a path"


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def image_ref(value: Any, what: str, where: str) -> str:
    """A local image path, as rows name one: a path string, a ``file://`` path, or ``{"path": ...}``
    (relative paths are read under the image root). URLs and inline data are refused, as is any
    other shape: an "unsupported format" sample error naming ``what`` (``images[0]``)."""
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        value = value["path"]
    if not isinstance(value, str):
        raise SampleError(
            f'{what} is {_show(value)}; only local image paths are read: a string or {{"path": ...}}',
            "unsupported format",
            where=where,
        )
    if value[:7].lower() == "file://":
        return unquote(value[7:])
    if _URL.match(value):
        raise SampleError(f"{what} is {_show(value)}: {REMOTE_REFUSED}", "unsupported format", where=where)
    return value


def item_fields(obj: dict, label: Callable[[str], str]) -> dict[str, Any]:
    """The ``text`` and ``instruction`` (strings; empty ones left out) and ``image`` (a local path,
    ``image_ref``) of an embedding item or row; ``label(key)`` names a field in the error."""
    item: dict[str, Any] = {}
    for key in ("text", "instruction"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise SampleError(f"{label(key)} must be a string, not {type(value).__name__}", "bad format")
        if value:
            item[key] = value
    if obj.get("image") not in (None, ""):
        item["image"] = image_ref(obj["image"], label("image"), "")
    return item


def _part_image(part: dict, what: str, where: str) -> str | None:
    """The image an image part names itself (``image_url.url``; ``image``/``path``/``url`` of a
    ``{"type": "image"}`` part), or None when it takes the row's next image."""
    if part["type"] == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise SampleError(f"{what} has no 'image_url': {{'url': ...}}", "bad format", where=where)
        return image_ref(url, what, where)
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return image_ref(part[key], f"{what}.{key}", where)
    return None


def read_conversation(conversations: list, images: list, where: str) -> tuple[list[dict], list]:
    """Messages with string contents, and the images in the order of their placeholders.

    A turn is ``{"from", "value"}`` (LLaVA / ShareGPT) or ``{"role", "content"}``; a content is a
    string or a list of OpenAI-style parts: ``{"type": "text", "text"}``, ``{"type": "image"}`` (takes
    the row's next image) and ``{"type": "image_url", "image_url": {"url": path}}``. Parts are joined
    with newlines, each image part written as the ``<image>`` placeholder. Each ``<image>`` in a text
    also takes the row's next image. What cannot be read is a sample error."""
    pending = list(images)  # the row's images, taken in order by the placeholders
    ordered: list = []
    placeholders = 0

    def take(n: int = 1) -> None:
        nonlocal placeholders
        placeholders += n
        for _ in range(min(n, len(pending))):
            ordered.append(pending.pop(0))

    msgs = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise SampleError(f"turn {k} must be an object with 'from' and 'value'", "bad format", where=where)
        role = ROLE_OF.get(turn.get("from", turn.get("role")))
        if role is None:
            raise SampleError(
                f"turn {k} has 'from'={turn.get('from', turn.get('role'))!r}; expected human, gpt or system",
                "bad format",
                where=where,
            )
        content = turn.get("value", turn.get("content"))
        if isinstance(content, str):
            take(content.count(IMAGE_PLACEHOLDER))
            msgs.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise SampleError(f"turn {k} has no text 'value'", "bad format", where=where)
        pieces = []
        for j, part in enumerate(content):
            what = f"turn {k} content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise SampleError(f"{what} is a text part without a string 'text'", "bad format", where=where)
                take(part["text"].count(IMAGE_PLACEHOLDER))
                if part["text"]:
                    pieces.append(part["text"])
            elif kind in ("image", "image_url"):
                own = _part_image(part, what, where)
                if own is None:
                    take()
                else:
                    placeholders += 1
                    ordered.append(own)
                pieces.append(IMAGE_PLACEHOLDER)
            else:
                raise SampleError(
                    f"{what} is {_show(part)}; content parts read: text, image, image_url",
                    "unsupported format",
                    where=where,
                )
        msgs.append({"role": role, "content": "\n".join(pieces)})
    if pending and not placeholders:
        # LLaVA convention: an image with no placeholder goes before the first user turn
        for m in msgs:
            if m["role"] == "user":
                m["content"] = f"{IMAGE_PLACEHOLDER}\n" + m["content"]
                break
    # images no placeholder took stay, so the up-front check reports the count mismatch
    return msgs, ordered + pending


def llava_messages(conversations: list[dict], has_image: bool, where: str) -> list[dict]:
    """The messages of ``read_conversation`` alone, for a row with (``has_image``) or without images."""
    return read_conversation(conversations, [None] if has_image else [], where)[0]


def resolve_image(root: Path | None, rel: str) -> Path:
    """Join ``rel`` to the image root; a path that escapes the root (``..``, absolute, symlink) is refused."""
    if root is None:
        raise SampleError(f"image {rel!r} is a relative path but no image_root is set", "bad image path")
    root_r = root.resolve()
    p = (root / rel).resolve()
    try:
        p.relative_to(root_r)
    except ValueError:
        raise SampleError(f"image path {rel!r} escapes the image root {root}", "image path escapes root") from None
    return p
