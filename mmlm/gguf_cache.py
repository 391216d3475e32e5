"""A GGUF LLM converted once: the first load dequantises the file through transformers (tens of
seconds: the metadata is parsed twice, then every tensor dequantised) and saves the result as a
transformers folder (``config.json``, ``model.safetensors`` in float32, the tokenizer with its chat
template); every later load reads that folder (memory-mapped safetensors: about a second).

The cache is keyed by the file's SHA-256, so a changed file is converted again and two paths to the
same file share one entry. Hashing a large file costs about a second, so the digest is remembered
per (path, size, modification time, inode) in ``index.json``.

Where: ``$MMLM_CACHE/gguf`` (``mmlm/cache.py``; default ``~/.cache/mmlm/gguf``); ``MMLM_CACHE=off``
loads from the GGUF file every time. A cache that cannot be written is skipped with a warning, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from mmlm.cache import cache_dir

log = logging.getLogger(__name__)


def cache_root() -> Path | None:
    """The GGUF cache folder, or None when ``MMLM_CACHE=off``."""
    return cache_dir("gguf")


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def file_digest(path: Path, root: Path | None = None) -> str:
    """SHA-256 of ``path``; remembered in ``root/index.json`` while the file is unchanged."""
    path = Path(path)
    index_file = root / "index.json" if root is not None else None
    key = _stat_key(path)
    index: dict[str, str] = {}
    if index_file is not None and index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError):
            index = {}
        if key in index:
            return index[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            h.update(block)
    digest = h.hexdigest()
    if index_file is not None:
        try:
            index[key] = digest
            index_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_file.with_name(f".index.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(index, indent=1))
            os.replace(tmp, index_file)
        except OSError as err:
            log.warning("could not record the digest of %s in %s: %s", path, index_file, err)
    return digest


def converted_folder(gguf: Path) -> Path | None:
    """The cache entry for ``gguf`` (which may not exist yet), or None when caching is off."""
    root = cache_root()
    if root is None:
        return None
    return root / file_digest(gguf, root)


def is_complete(entry: Path) -> bool:
    return (entry / "source.json").is_file()


def save_converted(entry: Path, model, tokenizer, gguf: Path) -> None:
    """Write the dequantised ``model`` and its ``tokenizer`` as ``entry`` (atomically: a folder with
    ``source.json`` is complete); failures are logged, never raised."""
    import torch
    from safetensors.torch import save_file

    from mmlm.storage import atomic_dir

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(entry) as tmp:
            # transformers refuses save_pretrained on a model it loaded from GGUF (marked quantized,
            # though its weights are dequantised): the config and the tensors are written directly,
            # in float32 so that any dtype can be loaded from the entry
            conf = model.config.to_dict()
            conf.pop("quantization_config", None)
            conf["torch_dtype"] = conf["dtype"] = "float32"
            (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tensors, seen = {}, set()
            for name, t in model.state_dict().items():
                if t.data_ptr() in seen:  # tied weights (the LM head) are re-tied by the config
                    continue
                seen.add(t.data_ptr())
                tensors[name] = t.detach().to(torch.float32).contiguous()
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": entry.name}, indent=1))
    except OSError as err:
        log.warning("could not cache the converted %s in %s: %s", gguf, entry, err)
