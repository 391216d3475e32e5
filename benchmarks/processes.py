"""One process against two: the demo recipe (configs/shapes-tiny.yaml, shortened) trained by
``mmlm train`` on one process with 2 threads and by ``mmlm train --processes 2`` (two CPU processes
over gloo, 1 thread each) with the same global batch. Prints, per stage, the largest difference
between the two loss curves (the mean of every log interval) and between the final weights, the
held-out accuracy of each, and each run's wall time and tokens/s.

    python benchmarks/processes.py                       # 100 + 100 steps
    python benchmarks/processes.py --steps 300

Both runs see the same samples in the same order; what differs is the summation order of the
gradient (two half-batch sums averaged instead of one) and the padding of each half, so the
figures are float rounding. Training amplifies rounding differences over the steps, so the script
also trains the one-process run again with 1 thread instead of 2 (another summation order, nothing
else changed): the control that says how large rounding alone makes the differences by then.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "passive"}
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="steps per stage")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from safetensors.torch import load_file

    from mmlm.config import load_config

    work = Path(args.workdir or tempfile.mkdtemp(prefix="procs-"))
    sets = [
        f"train.stages.0.steps={args.steps}",
        f"train.stages.1.steps={args.steps}",
        f"train.stages.1.eval_every={args.steps}",
        "train.log_every=10",
    ]
    cfg = load_config(ROOT / "configs" / "shapes-tiny.yaml", sets, variables={"out": str(work)})
    plan = work / "plan.yaml"
    plan.write_text(cfg.to_yaml())
    mmlm = [sys.executable, "-m", "mmlm.cli", "train", str(plan)]
    # the data is generated on first use: once, before either timed run
    subprocess.run([*mmlm, "--out", str(work / "warm"), "--dry-run"], check=True, stdout=subprocess.DEVNULL)
    walls = {
        1: run([*mmlm, "--out", str(work / "one"), "--set", "train.threads=2"], 2),
        2: run([*mmlm, "--out", str(work / "two"), "--set", "train.threads=1", "--processes", "2"], 1),
    }
    run([*mmlm, "--out", str(work / "control"), "--set", "train.threads=1"], 1)
    names = ((1, "one"), (2, "two"), (0, "control"))
    m = {n: json.loads((work / name / "metrics.json").read_text())["stages"] for n, name in names}

    def differences(st: str, other: int, folder: str) -> tuple[list[float], float]:
        c1, c2 = m[1][st]["loss_curve"], m[other][st]["loss_curve"]
        dl = [abs(a["loss"] - b["loss"]) for a, b in zip(c1, c2, strict=True)]
        w1 = load_file(str(work / "one" / "stages" / st / "model.safetensors"))
        w2 = load_file(str(work / folder / "stages" / st / "model.safetensors"))
        return dl, max((w1[k] - w2[k]).abs().max().item() for k in w1)

    for st in m[1]:
        c1, c2 = m[1][st]["loss_curve"], m[2][st]["loss_curve"]
        dl, dw = differences(st, 2, "two")
        cl, cw = differences(st, 0, "control")
        print(
            f"stage {st}: loss every {c1[0]['step']} steps, |1 process - 2 processes|: "
            + " ".join(f"{x:.0e}" for x in dl)
            + "\n  control |2 threads - 1 thread|, one process: "
            + " ".join(f"{x:.0e}" for x in cl)
            + f"\n  final loss {c1[-1]['loss']:.4f} vs {c2[-1]['loss']:.4f}; weights: largest difference {dw:.2e} "
            f"(control {cw:.2e}); tokens/s "
            f"{m[1][st]['tokens_per_s']:.0f} (1 process) vs {m[2][st]['tokens_per_s']:.0f} (2); "
            f"peak memory {m[1][st]['peak_memory_mb']:.0f} vs {m[2][st]['peak_memory_mb']:.0f} MiB per process"
        )
        for n in (1, 2, 0):
            if m[n][st]["curve"]:
                e = m[n][st]["curve"][-1]
                who = {1: "1 process", 2: "2 processes", 0: "1 process, 1 thread"}[n]
                print(f"  {who}: held-out accuracy {e['vqa_accuracy']:.3f} at step {e['step']}")
    cores = os.cpu_count()
    print(f"wall: 1 process {walls[1]:.0f}s, 2 processes {walls[2]:.0f}s (both on this machine's {cores} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
