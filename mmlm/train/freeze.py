"""Which parameters a stage trains, and at which learning rate (glob patterns over names)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch


def _match(name: str, patterns) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def apply_trainable(model, trainable: list[str], frozen: list[str]) -> list[str]:
    names = []
    for n, p in model.named_parameters():
        on = _match(n, trainable) and not _match(n, frozen)
        p.requires_grad_(on)
        if on:
            names.append(n)
    if not names:
        some = [n for n, _ in list(model.named_parameters())[:5]]
        raise ValueError(f"train.stages.*.trainable {trainable} matches no parameter; names look like {some}")
    return names


def param_groups(model, base_lr: float, lr_groups: dict[str, float], weight_decay: float) -> list[dict]:
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = base_lr
        for pat, val in lr_groups.items():
            if _match(n, [pat]):
                lr = val
                break
        wd = weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
