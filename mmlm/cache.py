"""mmlm's cache folder: ``$MMLM_CACHE`` (default ``~/.cache/mmlm``), one subfolder per kind of entry
(``gguf``: converted GGUF LLMs, ``checks``: stage data checks). ``MMLM_CACHE=off`` turns every cache
off: the work is then done each time."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path | None:
    """The folder for entries of ``kind``, or None when ``MMLM_CACHE=off``."""
    value = os.environ.get("MMLM_CACHE")
    if value is not None and value.strip().lower() in ("off", "0", "no", "none", ""):
        return None
    base = Path(value).expanduser() if value else Path.home() / ".cache" / "mmlm"
    return base / kind
