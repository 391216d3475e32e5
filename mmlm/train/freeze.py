"""Which parameters a stage trains, and at which learning rate (glob patterns over names)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from mmlm.errors import ConfigError


def _match(name: str, patterns) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def apply_trainable(model, trainable: list[str], frozen: list[str], where: str = "trainable") -> list[str]:
    names = []
    for n, p in model.named_parameters():
        on = _match(n, trainable) and not _match(n, frozen)
        p.requires_grad_(on)
        if on:
            names.append(n)
    if not names:
        raise ConfigError(unmatched_message(trainable, frozen, [n for n, _ in model.named_parameters()]), where)
    return names


def unmatched_message(trainable: list[str], frozen: list[str], names: list[str]) -> str:
    """What to tell a user whose ``trainable`` patterns (minus ``frozen``) select no parameter: the
    top-level groups that exist, so the fix is visible."""
    groups = sorted({".".join(n.split(".")[:2]) + ".*" for n in names})
    but = f" (minus frozen {frozen})" if frozen else ""
    return f"{trainable}{but} matches no parameter; parameter groups: {', '.join(groups)}"


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
