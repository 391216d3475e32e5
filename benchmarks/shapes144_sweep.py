"""Recipe sweep for configs/shapes-144.yaml on one GPU: variants trained side by side, then the
token-reduction benchmark on the best one that has reduction-trained twins.

The 144-token shapes model is launch-bound on a GPU (a 128-wide LLM), so one card trains a dozen
variants at once at close to the speed of one. Each variant is ``mmlm train configs/shapes-144.yaml``
with ``--set`` overrides; all read one pre-generated copy of the data. Twins are the same variant
trained with a reducer on from the first step (``model.token_reduction.image``), which is how a
user would train a model meant to run reduced.

    python benchmarks/shapes144_sweep.py --out /tmp/sweep --results $OUT   # on the device

Prints every variant's accuracy curve and final held-out table, and writes ``summary.txt``,
``logs.tgz`` and the benchmark's ``token_reduction.md`` to ``--results``. Every phase has a
deadline: a variant still training at its phase's deadline is stopped and reported with its last
evaluation.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/shapes-144.yaml"

WIDE = ["model.llm.config.hidden_size=256", "model.llm.config.intermediate_size=1024"]
HEADS8 = ["model.llm.config.num_attention_heads=8", "model.llm.config.num_key_value_heads=8"]
DEEP = ["model.llm.config.num_hidden_layers=6"]


def reduce(method: str, keep: float) -> list[str]:
    return [f"model.token_reduction.image.type={method}", f"model.token_reduction.image.keep={keep}"]


# name -> (train data size, overrides); "<base>~<method><keep>" is a twin of <base>
VARIANTS = {
    "n20k": (20000, []),
    "n20k-h8": (20000, HEADS8),
    "n20k-wide": (20000, WIDE + HEADS8),
    "n20k-deep": (20000, DEEP),
    "n20k-wide-deep": (20000, WIDE + HEADS8 + DEEP),
    "n20k-wide~tome0.5": (20000, WIDE + HEADS8 + reduce("tome", 0.5)),
    "n20k-wide~visionzip0.5": (20000, WIDE + HEADS8 + reduce("visionzip", 0.5)),
    "n20k-wide-deep~tome0.5": (20000, WIDE + HEADS8 + DEEP + reduce("tome", 0.5)),
    "n20k-wide-deep~visionzip0.5": (20000, WIDE + HEADS8 + DEEP + reduce("visionzip", 0.5)),
    "n20k-wide~tome0.25": (20000, WIDE + HEADS8 + reduce("tome", 0.25)),
}
EVAL = re.compile(r"eval @ (\w+) step (\d+): accuracy ([\d.]+) on (\d+)\s+\((.*)\)")


def mmlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmlm.cli", *args]


def generate(data: Path, n_train: int) -> dict[str, subprocess.Popen]:
    """Write the shared data sets (one process each); returns the processes by split."""
    splits = {"heldout": (200, 1001), "train": (n_train, 1)}
    procs = {}
    for name, (n, seed) in splits.items():
        if not (data / name / "world.json").is_file():
            cmd = mmlm("data", "shapes", "--out", str(data / name), "--n", str(n), "--seed", str(seed))
            procs[name] = subprocess.Popen(cmd)
    return procs


def launch(name: str, n: int, sets: list[str], out: Path, data: Path, args) -> subprocess.Popen:
    n = args.train_n or n
    sets = [
        "train.threads=1",
        f"train.stages.0.data.0.path={data / 'train'}",
        f"train.stages.0.data.0.n={n}",
        f"train.stages.1.data.0.path={data / 'train'}",
        f"train.stages.1.data.0.n={n}",
        f"train.eval.data.0.path={data / 'heldout'}",
        f"train.stages.0.steps={args.caption_steps}",
        f"train.stages.1.steps={args.steps}",
        "train.stages.1.eval_every=300",
        "train.stages.1.save_every=300",
        *sets,
    ]
    cmd = mmlm("train", CONFIG, "--out", str(out / name), *[a for s in sets for a in ("--set", s)])
    log = open(out / f"{name}.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, str]:
    """Wait for ``procs`` until ``deadline`` (time.time()); stop the rest. Returns name -> how it ended."""
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(2)
    ended = {}
    for name, p in procs.items():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
            ended[name] = "stopped at the deadline"
        else:
            ended[name] = "finished" if p.returncode == 0 else f"failed (exit {p.returncode})"
    return ended


def evals(log: Path) -> list[tuple[str, int, float, int, str]]:
    if not log.is_file():
        return []
    return [(m[1], int(m[2]), float(m[3]), int(m[4]), m[5]) for m in EVAL.finditer(log.read_text())]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--results", default="runs/sweep/results")
    ap.add_argument("--steps", type=int, default=1800, help="VQA steps per variant")
    ap.add_argument("--train-deadline", type=float, default=330, help="seconds from start for the training phase")
    ap.add_argument("--bench-deadline", type=float, default=560, help="seconds from start for the benchmark")
    ap.add_argument("--only", nargs="*", help="variant names to run (default all)")
    ap.add_argument("--train-n", type=int, default=None, help="training images for every variant (a smoke test)")
    ap.add_argument("--caption-steps", type=int, default=300)
    ap.add_argument("--skip-big", action="store_true", help="benchmark the shapes-144 models only")
    args = ap.parse_args()
    t0 = time.time()
    out, res = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    res.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    gen = generate(data, args.train_n or max(n for n, _ in VARIANTS.values()))
    for p in gen.values():
        p.wait()
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)

    names = args.only or list(VARIANTS)
    procs = {v: launch(v, *VARIANTS[v], out, data, args) for v in names}
    ended = wait_all(procs, t0 + args.train_deadline)
    print(f"training phase over at {time.time() - t0:.0f}s", flush=True)

    lines, final = [], {}
    for v in names:
        ev = evals(out / f"{v}.log")
        curve = "  ".join(f"{s}:{a:.3f}" for st, s, a, n, _ in ev if st == "vqa")
        last = ev[-1] if ev else None
        final[v] = last[2] if last else 0.0
        lines.append(f"{v:<28} {ended[v]:<24} curve {curve}")
        if last:
            lines.append(f"{'':<28} last: step {last[1]} accuracy {last[2]:.3f} on {last[3]} ({last[4]})")
        else:
            tail = (out / f"{v}.log").read_text()[-600:] if (out / f"{v}.log").is_file() else ""
            lines.append(f"{'':<28} no evaluation; log tail: {tail!r}")
    summary = "\n".join(lines)
    print(summary, flush=True)
    (res / "summary.txt").write_text(summary + "\n")

    # the benchmark: the best base variant with twins, its twins as the reduction-trained rows
    bases = sorted({v.split("~")[0] for v in names if "~" in v}, key=lambda b: -final.get(b, 0.0))
    bench_done = False
    for base in bases:
        ck = out / base / "final"
        if not (ck / "mmlm.yaml").is_file():
            continue
        twins = [out / v / "final" for v in names if v.startswith(base + "~")]
        twins = [t for t in twins if (t / "mmlm.yaml").is_file()]
        cmd = [
            sys.executable,
            "benchmarks/token_reduction.py",
            "--checkpoint",
            str(ck),
            "--data",
            str(data / "heldout"),
            "--device",
            "cuda" if torch.cuda.is_available() else "cpu",
            "--questions",
            "2000",
            "--threads",
            "4",
            "--big-repeats",
            "5",
            "--results",
            str(res / "token_reduction.md"),
            *[a for t in twins for a in ("--tuned", str(t))],
            *(["--skip-big"] if args.skip_big else []),
        ]
        print(f"benchmark on {base} with twins {[t.parent.name for t in twins]}", flush=True)
        bench = {"bench": subprocess.Popen(cmd, start_new_session=True)}
        print("benchmark:", wait_all(bench, t0 + args.bench_deadline)["bench"], flush=True)
        bench_done = True
        break
    if not bench_done:
        print("no base variant with twins finished: benchmark not run", flush=True)

    with tarfile.open(res / "logs.tgz", "w:gz") as tar:
        for v in names:
            if (out / f"{v}.log").is_file():
                tar.add(out / f"{v}.log", arcname=f"{v}.log")
            if (out / v / "metrics.json").is_file():
                tar.add(out / v / "metrics.json", arcname=f"{v}.metrics.json")
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
