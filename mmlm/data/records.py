"""The record every reader produces, and image path checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def llava_messages(conversations: list[dict], has_image: bool, where: str) -> list[dict]:
    msgs = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise SampleError(f"{where}: turn {k} must be an object with 'from' and 'value'", "bad format")
        role = ROLE_OF.get(turn.get("from", turn.get("role")))
        if role is None:
            raise SampleError(
                f"{where}: turn {k} has 'from'={turn.get('from')!r}; expected human, gpt or system", "bad format"
            )
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise SampleError(f"{where}: turn {k} has no text 'value'", "bad format")
        msgs.append({"role": role, "content": text})
    if has_image and not any(IMAGE_PLACEHOLDER in m["content"] for m in msgs):
        # LLaVA convention: an image with no placeholder goes before the first user turn
        for m in msgs:
            if m["role"] == "user":
                m["content"] = f"{IMAGE_PLACEHOLDER}\n" + m["content"]
                break
    return msgs


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
