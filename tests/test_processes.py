"""Training on several processes (mmlm/train/processes.py): two CPU processes over gloo under
``accelerate launch`` (``mmlm train --processes 2``) compute what one process computes with the same
global batch, and a 2-process run killed with SIGKILL resumes, with 2 processes or with 1, to the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmlm.config import parse_config
from mmlm.errors import ConfigError
from mmlm.train.processes import share_of
from mmlm.train.runner import train
from tests.helpers import tiny_raw

# Adam divides each gradient by its running RMS, so a gradient element near zero whose summation
# order differs (two half-batch sums instead of one) can move by a visible fraction of the learning
# rate; at lr 1e-4 that stays well under the 1e-5 the comparison asks for.
LR = 1e-4
TOL = 1e-5


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from mmlm.data.shapes import generate

    d = tmp_path_factory.mktemp("procs")
    generate(d / "train", 48, seed=3, image_size=32)
    generate(d / "held", 12, seed=11, image_size=32)
    raw = tiny_raw(str(d / "train"), n=48, steps=4, lr=LR)
    raw["train"]["log_every"] = 1
    raw["train"]["stages"][0]["lr"] = LR
    # the second stage: long enough to be killed in the middle, mixing SEA (media-token averages)
    # with the lm loss (supervised-token averages) and evaluating on held-out questions
    second = raw["train"]["stages"][1]
    second.update(steps=24, eval_every=8, objectives=[{"type": "lm"}, {"type": "sea", "weight": 0.5}])
    held = {"format": "shapes", "path": str(d / "held"), "n": 12, "seed": 11, "image_size": 32, "task": "vqa"}
    raw["train"]["eval"] = {"data": [held], "max_questions": 20}
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    one = d / "one"
    train(parse_config(raw), one)  # one process, in this one
    return path, one


def _mmlm(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mmlm.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    return out


def _stages(run) -> dict:
    return json.loads((run / "metrics.json").read_text())["stages"]


def _assert_same_weights(a, b, tol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, worst


@pytest.fixture(scope="module")
def two(recipe, tmp_path_factory):
    """The recipe trained by two processes, uninterrupted; and what the command printed."""
    out = tmp_path_factory.mktemp("two") / "run"
    printed = _finish(_mmlm("train", str(recipe[0]), "--out", str(out), "--processes", "2"))
    return out, printed


def test_two_processes_compute_what_one_does(recipe, two):
    _, one = recipe
    two, printed = two
    assert printed.count("checkpoint:") == 1  # the main process reports; the other is silent
    m1, m2 = _stages(one), _stages(two)
    assert m1["instruct"]["processes"] == 1 and m2["instruct"]["processes"] == 2
    for st in ("align", "instruct"):
        c1, c2 = m1[st]["loss_curve"], m2[st]["loss_curve"]
        assert [x["step"] for x in c1] == [x["step"] for x in c2] == list(range(1, len(c1) + 1))
        assert max(abs(x["loss"] - y["loss"]) for x, y in zip(c1, c2, strict=True)) <= TOL
        # the lm and SEA parts, each averaged over the global micro-batch
        assert m1[st]["losses"].keys() == m2[st]["losses"].keys()
        for k, v in m1[st]["losses"].items():
            assert abs(v - m2[st]["losses"][k]) <= 1e-4
        _assert_same_weights(one / "stages" / st, two / "stages" / st, TOL)
    # evaluation split between the processes and gathered: the same questions, the same answers
    e1, e2 = m1["instruct"]["curve"], m2["instruct"]["curve"]
    assert [(e["step"], e["vqa_accuracy"], e["by_type"]) for e in e1] == [
        (e["step"], e["vqa_accuracy"], e["by_type"]) for e in e2
    ]
    moved = load_file(str(one / "init" / "model.safetensors"))["connectors.image.net.0.weight"]
    assert not torch.equal(moved, load_file(str(two / "final" / "model.safetensors"))["connectors.image.net.0.weight"])


def test_sigkilled_two_process_run_resumes_with_two_or_one(recipe, two, tmp_path):
    cfg, one = recipe
    uninterrupted = two[0]
    cut = tmp_path / "cut"
    p = _mmlm("train", str(cfg), "--out", str(cut), "--processes", "2")
    state = cut / "state" / "instruct" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 4:
            break
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed"
    # the launcher and both training processes (torchrun starts them in sessions of their own), no clean-up
    everyone = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    assert len(everyone) >= 3
    for proc in everyone:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(everyone, timeout=30)
    p.communicate()
    assert not (cut / "stages" / "instruct").exists()
    saved = json.loads(state.read_text())["step"]
    assert 4 <= saved < 24
    other = tmp_path / "cut-one"
    shutil.copytree(cut, other, symlinks=True)

    _finish(_mmlm("train", str(cfg), "--out", str(cut), "--processes", "2", "--resume"))
    # same processes, same global positions: the very same arithmetic
    _assert_same_weights(uninterrupted / "final", cut / "final", 0.0)
    assert _stages(cut)["instruct"]["loss_curve"] == _stages(uninterrupted)["instruct"]["loss_curve"]
    assert _stages(cut)["instruct"]["resumed_from"] == saved, (saved, _stages(cut)["instruct"])

    # the 2-process state resumed by one process continues at the same global position
    train(parse_config(yaml.safe_load(cfg.read_text())), other, resume=True)
    _assert_same_weights(one / "final", other / "final", TOL)
    c1 = _stages(one)["instruct"]["loss_curve"]
    c2 = _stages(other)["instruct"]["loss_curve"]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(c1, c2, strict=True)) <= TOL


def test_each_process_takes_an_equal_share_of_the_global_batch():
    assert [share_of(8, r, 4, "train.stages.0") for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert share_of(6, 0, 1, "train.stages.0") == (0, 6)
    with pytest.raises(ConfigError) as err:
        share_of(6, 1, 4, "train.stages.1")
    assert err.value.path == "train.stages.1.batch_size" and "4 processes" in str(err.value)
