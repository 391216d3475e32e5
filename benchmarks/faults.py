"""Kill a tiny ``mmlm train`` run with SIGKILL at random moments, and once exactly between the
renames of a state save, resume it each time in a new process, and compare its final weights with
an uninterrupted run. Prints the number of kills, whether the weights are identical, and any
leftover of interrupted writes.

    python benchmarks/faults.py --kills 20
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# a process that SIGKILLs itself right after the Nth state save has moved the previous state away
# (``state/STAGE`` -> ``.STAGE.old-*``) and before the new one is renamed into place
KILL_AT_RENAME = """
import os, signal, sys
real, seen = os.replace, [0]
def replace(src, dst):
    real(src, dst)
    if "/state/" in str(dst) and ".old-" in str(dst):
        seen[0] += 1
        if seen[0] == int(os.environ["MMLM_KILL_AT_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from mmlm.cli import main
sys.argv = ["mmlm", *sys.argv[1:]]
main()
"""


def config(work: Path, steps: int) -> Path:
    from tests.helpers import tiny_raw

    raw = tiny_raw(str(work / "shapes"), n=16, steps=2)
    raw["train"]["stages"][1].update(steps=steps, save_every=3)
    path = work / "faults.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def leftovers(out: Path) -> list[str]:
    return sorted(
        str(p.relative_to(out)) for p in out.rglob(".*") if any(k in p.name for k in (".tmp-", ".new-", ".old-"))
    )


def start(cfg: Path, out: Path, resume: bool, env: dict) -> subprocess.Popen:
    args = [str(cfg), "--out", str(out), *(["--resume"] if resume else [])]
    return subprocess.Popen(
        [sys.executable, "-c", KILL_AT_RENAME, "train", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def campaign(work: Path, kills: int, steps: int, seed: int = 0, log=print) -> dict:
    import torch
    from safetensors.torch import load_file

    from mmlm.config import load_config
    from mmlm.data.sources import read_source
    from mmlm.train.runner import train

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = config(work, steps)
    cfg = load_config(cfg_path)
    read_source(cfg.train.stages[0].data[0])  # the data exists before any kill
    train(cfg, work / "full")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MMLM_KILL_AT_SAVE": "0"}
    out = work / "cut"
    done, killed, runs, resumed_at = False, 0, 0, None
    # first the deterministic one: killed between the two renames of the 2nd state save
    proc = start(cfg_path, out, False, {**env, "MMLM_KILL_AT_SAVE": "2"})
    proc.communicate(timeout=900)  # a loaded 2-core machine is slow
    runs += 1
    killed += proc.returncode == -signal.SIGKILL
    while not done:
        proc = start(cfg_path, out, True, env)
        runs += 1
        if killed < kills:
            for line in proc.stdout:  # training has started: kill at a random moment from here
                if line.startswith("stage instruct"):
                    if resumed_at is None:  # the run after the kill mid-save
                        resumed_at = int(line.rsplit("resuming at step", 1)[1]) if "resuming at step" in line else 0
                    time.sleep(rng.uniform(0.0, 1.5))
                    break
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=900)  # a loaded 2-core machine is slow
        if proc.returncode == -signal.SIGKILL:
            killed += 1
        elif proc.returncode == 0:
            done = True
        else:
            raise RuntimeError(f"run {runs} exited with {proc.returncode}")
        log(f"run {runs}: exit {proc.returncode}, kills so far {killed}")
    a = load_file(str(work / "full" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resumed_at: where the run killed mid-save continued (the save at step 9, the 2nd to replace a state)
    return {
        "kills": killed,
        "runs": runs,
        "identical": identical,
        "leftovers": leftovers(out),
        "resumed_at": resumed_at,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=1500, help="steps of the second stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "faults"))
    args = ap.parse_args(argv)
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    r = campaign(Path(args.work), args.kills, args.steps, args.seed)
    print(
        f"{r['kills']} SIGKILLs (one between the renames of a state save) over {r['runs']} processes; "
        f"final weights identical to an uninterrupted run: {r['identical']}; "
        f"the run killed between the renames of its step-9 state save resumed at step {r['resumed_at']}; "
        f"leftovers of interrupted writes: {r['leftovers'] or 'none'}"
    )
    return 0 if r["identical"] and not r["leftovers"] and r["resumed_at"] == 9 else 1


if __name__ == "__main__":
    sys.exit(main())
