"""Files written atomically and tensors stored as safetensors: the primitives under checkpoints
(``MultimodalLM.save``, ``mmlm/checkpoint.py``) and training state (``mmlm/train/state.py``).
Nothing here unpickles."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CHECKPOINT_FORMAT = 2  # 1: before objectives were parts (a `sea` connector wrapped another)


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and bytes: equal digests mean equal tensors."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    if t.numel():
        h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def dedup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases of tensors already present (tied embeddings): safetensors refuses shared storage."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else (k,)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(dedup(tensors), str(path), metadata=metadata)


class atomic_dir:
    """Context manager: write into a temporary sibling directory, then move it into place."""

    def __init__(self, target):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists() or self.target.is_symlink():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            if old.is_symlink() or old.is_file():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        return False
