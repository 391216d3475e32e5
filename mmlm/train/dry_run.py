"""``mmlm train CONFIG --dry-run``: build the model and read every stage's data without training or
writing anything, and report what a run would do: parameters (total and trainable, per part and
stage, LoRA applied as the stage would), the token lengths of each stage's samples (media
included) with what would be skipped and why, and an estimate of the memory one process needs.

The memory estimate counts what is known exactly (weights at their dtype; for trainable
parameters a gradient and AdamW's two moments in fp32) and estimates the LLM's activations for a
micro-batch of the stage's longest samples with Korthikanti et al. (2022)'s per-layer figure,
s*b*h*(34 + 5*a*s/h) bytes in 16-bit (twice that in fp32; about 2*s*b*h per layer with activation
checkpointing). Encoder activations and the allocator's slack are not counted. With several
processes (``--processes N``) each holds the whole model (DDP) and activations for its share of the
global micro-batch.

A model built from configs (no pretrained weights to read) is built on PyTorch's meta device: shapes
and dtypes without memory, so a 7B-parameter plan is reported on a laptop.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from mmlm.config import PipelineConfig
from mmlm.model import build


def _part(name: str) -> str:
    bits = name.split(".")
    if bits[0] in ("encoders", "connectors", "media_pos"):
        return ".".join(bits[:2])
    return bits[0]


def _params(model) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        row = out.setdefault(_part(n), {"total": 0, "trainable": 0, "bytes": 0, "trainable_bytes": 0})
        row["total"] += p.numel()
        row["bytes"] += p.numel() * p.element_size()
        if p.requires_grad:
            row["trainable"] += p.numel()
    return out


def _activations(model, st, lengths: list[int], processes: int = 1) -> int:
    cfg = model.llm.config
    h = cfg.hidden_size
    a = cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    s = max(lengths) if lengths else 0
    b = max(1, st.batch_size // processes)
    if st.gradient_checkpointing:
        per_layer = 2 * s * b * h
        full_layer = s * b * h * (34 + 5 * a * s / h)
        total = per_layer * layers + full_layer
    else:
        total = s * b * h * (34 + 5 * a * s / h) * layers
    if st.precision == "no":
        total *= 2
    return int(total + 4 * b * s * cfg.vocab_size)  # the logits in fp32


def _distribution(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {}
    q = sorted(lengths)
    return {
        "n": len(q),
        "min": q[0],
        "median": int(statistics.median(q)),
        "p95": q[min(len(q) - 1, int(0.95 * len(q)))],
        "max": q[-1],
    }


def _from_configs_only(cfg: PipelineConfig) -> bool:
    """Whether every encoder and the LLM are built from configs: none names a file, folder or hub id
    to load weights from (its ``path_keys`` options all unset)."""
    from mmlm.config import path_keys
    from mmlm.registry import ENCODERS, LLM_SOURCES

    parts = [(p, ENCODERS) for p in cfg.model.encoders.values()] + [(cfg.model.llm, LLM_SOURCES)]
    return not any(part.options().get(key) for part, registry in parts for key in path_keys(registry, part.name))


def dry_run(cfg: PipelineConfig, processes: int = 1) -> dict[str, Any]:
    """What ``mmlm train`` would do with ``cfg`` on ``processes`` processes, per stage; nothing is
    trained or written."""
    from mmlm.checkpoint import load_as
    from mmlm.train.runner import Trainer, select_trainable
    from mmlm.train.seeds import derive_seed

    trainer = Trainer(cfg, out=".")  # its run folder is never opened: nothing is written
    trainer._check_inputs(None)
    torch.manual_seed(derive_seed(cfg.train.seed, 0, 0, "init"))
    if cfg.train.init_from:
        model = load_as(cfg.train.init_from, cfg)
    elif _from_configs_only(cfg):
        with torch.device("meta"):
            model = build(cfg, texts=trainer.tokenizer_texts())
    else:
        model = build(cfg, texts=trainer.tokenizer_texts())
    report: dict[str, Any] = {"stages": [], "processes": processes}
    for idx, st in enumerate(cfg.train.stages):
        where = f"train.stages.{idx}"
        select_trainable(model, st, where)
        params = _params(model)
        data = trainer._dataset(model, st.data, f"{where}.data", "skip", st.name)
        lengths = [n for n in data.lengths if n is not None]
        trainable = sum(r["trainable"] for r in params.values())
        weights = sum(r["bytes"] for r in params.values())
        optimizer = 12 * trainable  # fp32 gradient + AdamW's two moments
        acts = _activations(model, st, lengths, processes)
        skipped = dict(data.skipped)
        report["stages"].append(
            {
                "name": st.name,
                "params": params,
                "total": sum(r["total"] for r in params.values()),
                "trainable": trainable,
                "lora": {p: o.model_dump(mode="json") for p, o in st.lora.items()},
                "samples": len(data),
                "skipped": skipped,
                "would_stop": bool(skipped) and st.on_bad_sample == "error",
                "lengths": _distribution(lengths),
                "max_length": model.processor.config.max_length,
                "memory": {
                    "weights": weights,
                    "gradients_and_optimizer": optimizer,
                    "activations": acts,
                    "total": weights + optimizer + acts,
                    "precision": st.precision,
                    "batch_size": st.batch_size,
                    "batch_per_process": max(1, st.batch_size // processes),
                    "gradient_checkpointing": st.gradient_checkpointing,
                },
            }
        )
    return report


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_report(report: dict[str, Any]) -> str:
    """The dry run as text, one block per stage."""
    lines = []
    for st in report["stages"]:
        adapted = ", ".join(f"{p} (r {o['r']})" for p, o in st["lora"].items())
        lora = f", LoRA on {adapted}" if adapted else ""
        lines.append(f"stage {st['name']}: {_count(st['trainable'])} of {_count(st['total'])} parameters train{lora}")
        for part, r in st["params"].items():
            lines.append(f"  {part:<24} {_count(r['total']):>9} total  {_count(r['trainable']):>9} trainable")
        ln = st["lengths"]
        if ln:
            lines.append(
                f"  samples: {st['samples']} used; tokens (media included) min {ln['min']}, median {ln['median']}, "
                f"p95 {ln['p95']}, max {ln['max']} (processor.max_length {st['max_length']})"
            )
        else:
            lines.append(f"  samples: {st['samples']} used")
        if st["skipped"]:
            what = ", ".join(f"{k}: {v}" for k, v in st["skipped"].items())
            verdict = " - with on_bad_sample: error the run stops at the first" if st["would_stop"] else ""
            lines.append(f"  would skip {sum(st['skipped'].values())} ({what}){verdict}")
        m = st["memory"]
        ckpt = ", activation checkpointing" if m["gradient_checkpointing"] else ""
        batch = f"batch {m['batch_size']}"
        if report.get("processes", 1) > 1:
            batch += f" = {report['processes']} x {m['batch_per_process']}"
        lines.append(
            f"  memory per process (estimate; precision {m['precision']}, {batch}{ckpt}): "
            f"weights {_size(m['weights'])} + gradients and AdamW {_size(m['gradients_and_optimizer'])} + "
            f"LLM activations {_size(m['activations'])} = {_size(m['total'])}"
        )
    return "\n".join(lines)
