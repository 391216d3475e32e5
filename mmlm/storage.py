"""Files written atomically and tensors stored as safetensors: the primitives under checkpoints
(``MultimodalLM.save``, ``mmlm/checkpoint.py``) and training state (``mmlm/train/state.py``).
Nothing here unpickles."""

from __future__ import annotations

import hashlib
import os
import re
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


def refuse_nonempty(out: Path, overwrite: bool) -> None:
    """An export target must be new or empty unless ``overwrite``: a FileExistsError names it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder or overwrite it")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(dedup(tensors), str(path), metadata=metadata)


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    else:
        shutil.rmtree(p, ignore_errors=True)


def _siblings(target: Path, kind: str) -> list[Path]:
    """``.NAME.KIND-*`` siblings of ``target``, oldest first (names end in a monotonic clock)."""
    found = target.parent.glob(f".{target.name}.{kind}-*")
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else 0)


class atomic_dir:
    """Context manager: write into a temporary sibling directory, then move it into place.

    The swap is three renames: ``.NAME.tmp-*`` (being written) -> ``.NAME.new-*`` (complete) ->
    ``NAME``, the previous ``NAME`` going to ``.NAME.old-*`` and then away. A process killed at any
    point leaves enough on disk for ``recover`` to put the newest complete version in place."""

    def __init__(self, target):
        self.target = Path(target)

    def _name(self, kind: str) -> Path:
        return self.target.parent / f".{self.target.name}.{kind}-{os.getpid()}-{time.monotonic_ns()}"

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self._name("tmp")
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        new = self._name("new")
        os.replace(self.tmp, new)
        old = None
        if self.target.exists() or self.target.is_symlink():
            old = self._name("old")
            os.replace(self.target, old)
        os.replace(new, self.target)
        if old is not None:
            _remove(old)
        return False


_LEFTOVER = re.compile(r"^\.(.+)\.(?:tmp|new|old)-\d+-\d+$")  # atomic_dir's sibling names, see _name


def recover_folder(folder) -> None:
    """``recover`` every target in ``folder`` that an interrupted ``atomic_dir`` left siblings of."""
    folder = Path(folder)
    if folder.is_dir():
        names = {m.group(1) for p in folder.iterdir() if (m := _LEFTOVER.match(p.name))}
        for name in sorted(names):
            recover(folder / name)


def recover(target) -> bool:
    """After a kill: put the newest complete version of ``target`` in place (a ``.new-*`` one, else
    the previous ``NAME`` kept as ``.old-*``) and remove every leftover of interrupted writes.
    Returns whether ``target`` exists afterwards. Only the run's owner may call it."""
    target = Path(target)
    new, old = _siblings(target, "new"), _siblings(target, "old")
    if new:
        if target.exists() or target.is_symlink():
            _remove(target)
        os.replace(new[-1], target)
    elif old and not (target.exists() or target.is_symlink()):
        os.replace(old[-1], target)
    for p in _siblings(target, "new") + _siblings(target, "old") + _siblings(target, "tmp"):
        _remove(p)
    return target.exists()
