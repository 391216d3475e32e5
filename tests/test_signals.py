"""A real ``mmlm train`` process stopped by SIGTERM (what schedulers send before preemption) keeps
its last completed step, says where, and resumes to the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from mmlm.config import parse_config
from mmlm.train.runner import train
from tests.helpers import tiny_raw


def test_sigterm_saves_the_last_step_and_the_run_resumes_identically(tmp_path):
    raw = tiny_raw(str(tmp_path / "shapes"), n=16, steps=2)
    raw["train"]["stages"][1].update(steps=400, save_every=100000)  # only the signal can save a state
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "cut"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmlm.cli", "train", str(tmp_path / "c.yaml"), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    for line in proc.stdout:  # progress lines come every 50 steps when not on a terminal
        if "instruct step 50/400" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "no progress line within 120 s"
    rest_out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: stage instruct stopped at step" in err and "--resume" in err
    state = json.loads((out / "state" / "instruct" / "state.json").read_text())
    assert 50 <= state["step"] < 400
    assert f"at step {state['step']}" in err

    cfg = parse_config(raw)
    train(cfg, out, resume=True)
    train(cfg, tmp_path / "full")
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
