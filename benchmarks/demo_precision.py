"""The demo recipe (configs/shapes-tiny.yaml) under one precision and several seeds: held-out accuracy
per question type, the image-use check and the wall time of each run, on whatever device torch finds
(bf16 autocast on CUDA, or on the CPU when no GPU is there).

Usage: python benchmarks/demo_precision.py --precision bf16 --seeds 0 1 2 --out /tmp/demo-bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/demo-precision")
    ap.add_argument("--config", default="shapes-tiny.yaml")
    args = ap.parse_args()

    import transformers

    from mmlm.config import load_config
    from mmlm.demo import run_demo

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    print(
        f"device: {device}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"precision {args.precision}; recipe {args.config}",
        flush=True,
    )
    stages = len(load_config(args.config, variables={"out": "x"}).train.stages)
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        sets = [f"train.stages.{i}.precision={args.precision}" for i in range(stages)] + [f"train.seed={seed}"]
        t0 = time.time()
        m = run_demo(out, sets, config=args.config)
        use = m.get("image_use", {})
        rows.append((seed, m, use, time.time() - t0))
        by = "  ".join(f"{k} {v:.3f}" for k, v in m["by_type"].items())
        print(
            f"seed {seed}: accuracy {m['vqa_accuracy']:.3f} on {m['n_eval']} ({by}); "
            f"with other images {use.get('accuracy_shuffled', float('nan')):.3f}; answer loss "
            f"{use.get('loss', float('nan')):.3f} own / {use.get('loss_shuffled', float('nan')):.3f} other; "
            f"train {m['train_seconds']}s, wall {time.time() - t0:.0f}s",
            flush=True,
        )
    types = sorted({t for _, m, _, _ in rows for t in m["by_type"]})
    print()
    print("| seed | accuracy | " + " | ".join(types) + " | other images | loss own / other | train s |")
    print("|---:|---:|" + "---:|" * len(types) + "---:|---:|---:|")
    for seed, m, use, _ in rows:
        cells = " | ".join(f"{m['by_type'].get(t, float('nan')):.3f}" for t in types)
        nan = float("nan")
        other = f"{use.get('accuracy_shuffled', nan):.3f}"
        losses = f"{use.get('loss', nan):.3f} / {use.get('loss_shuffled', nan):.3f}"
        print(f"| {seed} | {m['vqa_accuracy']:.3f} | {cells} | {other} | {losses} | {m['train_seconds']} |")
    (Path(args.out) / "summary.json").write_text(
        json.dumps({"device": device, "precision": args.precision, "runs": {s: m for s, m, _, _ in rows}}, indent=2)
    )


if __name__ == "__main__":
    main()
