"""Checkpoints: a directory with ``mmlm.yaml`` (the resolved config), ``model.safetensors`` (the
tensors that differ from the pretrained sources the config references, or all with ``full``),
the tokenizer files, and ``metrics.json`` when a stage evaluated. Writes are atomic (a temporary
directory, then a rename); loading reads safetensors only and never unpickles.

Training state for resuming a stage (trainable weights, optimizer moments, step) is kept the same
way: safetensors plus JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def _dedup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases of tensors already present (tied embeddings): safetensors refuses shared storage."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else (k,)
        if key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def tensors_to_save(model, full: bool = False) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if full:
        return _dedup(state)
    keep = {}
    for k, v in state.items():
        from_source = any(k.startswith(p) for p in model.pretrained_prefixes)
        if not from_source or k in model.touched:
            keep[k] = v
    return _dedup(keep)


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


def save_checkpoint(model, directory, full: bool = False, metrics: dict | None = None, extra: dict | None = None) -> Path:
    directory = Path(directory)
    tensors = tensors_to_save(model, full)
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "mmlm": str(FORMAT_VERSION)})
        model.tokenizer.save_pretrained(str(tmp))
        doc = {
            "mmlm": {
                "format": FORMAT_VERSION,
                "tensors": "full" if full else "trained",
                "pretrained_prefixes": list(model.pretrained_prefixes),
                **(extra or {}),
            },
            **model.config.to_dict(),
        }
        (tmp / "mmlm.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return directory


def read_checkpoint_config(directory):
    from mmlm.config import parse_config

    directory = Path(directory)
    f = directory / "mmlm.yaml"
    if not f.is_file():
        raise FileNotFoundError(f"{directory} is not an mmlm checkpoint (no mmlm.yaml)")
    raw = yaml.safe_load(f.read_text())
    meta = raw.pop("mmlm", {})
    return parse_config(raw), meta


def load_checkpoint(directory, overrides: tuple[str, ...] = (), device: str | None = None):
    from mmlm.config import parse_config
    from mmlm.model import build

    directory = Path(directory)
    cfg, meta = read_checkpoint_config(directory)
    if overrides:
        cfg = parse_config(cfg.to_dict(), overrides)
    model = build(cfg, tokenizer_dir=str(directory))
    tensors = load_file(str(directory / "model.safetensors"))
    load_tensors(model, tensors, where=str(directory / "model.safetensors"))
    model.touched = {k for k in tensors if any(k.startswith(p) for p in model.pretrained_prefixes)}
    if device:
        model.to(device)
    model.eval()
    return model


def load_tensors(model, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    own = model.state_dict()
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} tensors the model does not have, e.g. {unknown[:3]}")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model")
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------------------------------------
# training state (resume)


def save_train_state(directory, model, optimizer, step: int, info: dict[str, Any]) -> None:
    """Trainable weights + optimizer state + step, atomically."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    name_of = {id(p): n for n, p in params.items()}
    opt_tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            n = name_of[id(p)]
            for key, val in st.items():
                if isinstance(val, torch.Tensor) and val.ndim > 0:
                    opt_tensors[f"{n}::{key}"] = val.detach().contiguous().cpu()
                else:
                    scalars.setdefault(n, {})[key] = float(val)
    with atomic_dir(directory) as tmp:
        save_file(_dedup(dict(params)), str(tmp / "weights.safetensors"))
        save_file(opt_tensors or {"__empty__": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "scalars": scalars, **info}, indent=2))


def load_train_state(directory, model, optimizer) -> dict[str, Any]:
    directory = Path(directory)
    state = json.loads((directory / "state.json").read_text())
    load_tensors(model, load_file(str(directory / "weights.safetensors")), where=str(directory))
    opt_tensors = load_file(str(directory / "optimizer.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for n, p in params.items():
        st = {}
        for key, val in state["scalars"].get(n, {}).items():
            st[key] = torch.tensor(val)
        prefix = f"{n}::"
        for k, v in opt_tensors.items():
            if k.startswith(prefix):
                st[k[len(prefix):]] = v.to(p.device)
        if st:
            optimizer.state[p] = st
    return state
