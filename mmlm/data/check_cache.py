"""The stage data check, done once: what ``StageDataset`` finds for each record (its length in LLM
positions, media included, or why it is refused) is saved under ``$MMLM_CACHE/checks``
(``mmlm/cache.py``) and read back by the next stage start or resume over the same data and processor.

The key is a SHA-256 over everything the check reads: each record's messages, media references,
image root and load error, in order, and the processor's settings, tokenizer (its full definition
and chat template) and media specs (placeholder, tokens per item, tiling). Records holding images in
memory (a Hugging Face dataset's decoded images) or embedding pairs are not cached. With tiling on,
each image file's size and modification time join the key (its tile count depends on its size). What a cached
result does not repeat is the file-system part of the check (each media file exists): a file removed
since is found when a batch draws it, and ``on_bad_sample`` decides as for a corrupt image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from mmlm.cache import cache_dir

log = logging.getLogger(__name__)

# a record's result: its token count, or [reason, detail] when it is refused
Result = int | list


def _media_key(item) -> str | None:
    if isinstance(item, str):
        return item
    shard = getattr(item, "shard", None)  # a WebDataset member
    if shard is not None:
        return f"{shard}:{item.name}:{item.offset}:{item.size}"
    return None  # in memory: not cacheable


def _stamp(root, rel: str) -> str:
    try:
        st = (Path(root or ".") / rel).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def fingerprint(records: Sequence, processor) -> str | None:
    """The cache key of checking ``records`` with ``processor``, or None when they cannot be cached."""
    if cache_dir("checks") is None:
        return None
    h = hashlib.sha256()
    tok = processor.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(processor.config.model_dump_json().encode())
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    h.update(repr((getattr(tok, "chat_template", None), tok.all_special_tokens)).encode())
    for name, spec in sorted(processor.media.items()):
        h.update(repr((name, spec.placeholder, spec.num_tokens, repr(spec.tiling))).encode())
    tiled = any(spec.tiling is not None for spec in processor.media.values())
    for rec in records:
        if not hasattr(rec, "messages"):  # embedding pairs
            return None
        media = [_media_key(m) for m in (*rec.images, *rec.audios, *rec.videos)]
        if any(m is None for m in media):
            return None
        if tiled:  # tiles depend on each image's size: a changed file changes the key
            media += [_stamp(rec.image_root, m) for m in rec.images if isinstance(m, str)]
        error = rec.info.get("error")
        h.update(repr((rec.messages, media, len(rec.images), str(rec.image_root), str(error))).encode())
    return h.hexdigest()


def _file(key: str) -> Path | None:
    root = cache_dir("checks")
    return None if root is None else root / f"{key}.json"


def load(key: str | None, n: int) -> list[Result] | None:
    """The saved results of ``n`` records, or None."""
    path = _file(key) if key else None
    if path is None or not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring an unreadable data check cache %s: %s", path, err)
        return None
    return results if isinstance(results, list) and len(results) == n else None


def save(key: str | None, results: list[Result]) -> None:
    path = _file(key) if key else None
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(results, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not save the data check cache %s: %s", path, err)
