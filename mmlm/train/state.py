"""Training state for resuming a stage: the trainable weights, the optimizer's moments and the step,
as safetensors plus JSON, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmlm.checkpoint import load_tensors, read_tensors
from mmlm.storage import atomic_dir, save_tensors


def save_train_state(directory, model, optimizer, step: int, info: dict[str, Any]) -> None:
    """Trainable weights + optimizer state + step, atomically."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    name_of = {id(p): n for n, p in params.items()}
    opt_tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = name_of[id(p)]
            for key, val in optimizer.state.get(p, {}).items():
                if isinstance(val, torch.Tensor) and val.ndim > 0:
                    opt_tensors[f"{n}::{key}"] = val
                else:
                    scalars.setdefault(n, {})[key] = float(val)
    with atomic_dir(directory) as tmp:
        save_tensors(params, tmp / "weights.safetensors")
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "scalars": scalars, **info}, indent=2))


def load_train_state(directory, model, optimizer) -> dict[str, Any]:
    directory = Path(directory)
    state = json.loads((directory / "state.json").read_text())
    load_tensors(model, read_tensors(directory / "weights.safetensors"), str(directory), complete=False)
    opt_tensors = read_tensors(directory / "optimizer.safetensors")
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        st = {key: torch.tensor(val) for key, val in state["scalars"].get(n, {}).items()}
        prefix = f"{n}::"
        for k, v in opt_tensors.items():
            if k.startswith(prefix):
                st[k[len(prefix) :]] = v.to(p.device)
        if st:
            optimizer.state[p] = st
    return state
