"""The training log: a line every ``train.log_every`` steps, showing the mean loss of those steps, and a
resumed run logs and records exactly the numbers of an uninterrupted one."""

import io
import json
import math
import re

import pytest
from rich.console import Console

from mmlm.config import parse_config
from mmlm.errors import TrainingInterrupted
from mmlm.train.progress import ConsoleReporter
from mmlm.train.runner import Trainer, train
from tests.helpers import tiny_raw

LINE = re.compile(r"^\s+(\w+) step (\d+)/(\d+)\s+loss (\S+)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from mmlm.data.shapes import generate

    d = tmp_path_factory.mktemp("shapes")
    generate(d, 40, seed=3, image_size=32)
    return str(d)


def one_stage(data_dir, steps: int, log_every: int, **stage):
    """The tiny config's second stage alone (all weights trained, LM + SEA objectives)."""
    raw = tiny_raw(data_dir, steps=steps, objectives=[{"type": "lm"}, {"type": "sea", "weight": 0.5}], **stage)
    raw["train"]["stages"] = raw["train"]["stages"][1:]
    raw["train"]["log_every"] = log_every
    return raw


class Recorder(ConsoleReporter):
    """A plain-text ConsoleReporter (not a terminal) that also keeps every ``step`` call."""

    def __init__(self):
        self.out = io.StringIO()
        super().__init__(Console(file=self.out, force_terminal=False, width=200))
        self.calls = []

    def step(self, name, step, total, loss, tps, lr):
        self.calls.append((step, loss))
        super().step(name, step, total, loss, tps, lr)

    def lines(self):
        return [m.groups() for m in map(LINE.match, self.out.getvalue().splitlines()) if m]


@pytest.fixture
def step_losses(monkeypatch):
    """Each micro-batch's losses by name as the objectives computed them (grad_accum is 1: one per step)."""
    seen = []
    original = Trainer._losses

    def recording(self, run, batch):
        losses = original(self, run, batch)
        seen.append({k: float(v.detach()) for k, v in losses.items()})
        return losses

    monkeypatch.setattr(Trainer, "_losses", recording)
    return seen


def test_the_logged_loss_is_the_mean_of_the_steps_since_the_last_line(data_dir, tmp_path, step_losses):
    rep = Recorder()
    train(parse_config(one_stage(data_dir, steps=7, log_every=3)), tmp_path / "run", reporter=rep)
    assert len(step_losses) == 7
    per_step = [sum(d.values()) for d in step_losses]
    means = {3: per_step[0:3], 6: per_step[3:6], 7: per_step[6:7]}
    means = {s: sum(v) / len(v) for s, v in means.items()}
    # printed at steps 3, 6 and the last, each with its interval's mean
    assert [(int(s), float(loss)) for _, s, _, loss in rep.lines()] == [(s, round(m, 4)) for s, m in means.items()]
    # every step call carries the last closed interval's mean (nan before the first one)
    calls = dict(rep.calls)
    assert math.isnan(calls[1]) and math.isnan(calls[2])
    for s in range(3, 8):
        assert calls[s] == pytest.approx(means[3 if s < 6 else s], rel=1e-12, abs=0), s
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["instruct"]
    assert summary["final_loss"] == round(means[7], 4)
    assert summary["losses"] == {k: round(v, 4) for k, v in step_losses[6].items()}


def test_a_resumed_run_logs_and_records_the_same_losses_as_an_uninterrupted_one(data_dir, tmp_path):
    raw = one_stage(data_dir, steps=7, log_every=3, eval_every=2, save_every=5)
    raw["train"]["eval"] = {"data": raw["train"]["stages"][0]["data"], "max_questions": 4, "batch_size": 4}
    cfg = parse_config(raw)
    full = Recorder()
    train(cfg, tmp_path / "full", reporter=full)
    cut, resumed = Recorder(), Recorder()
    # killed after step 5, in the middle of the interval 4..6: the saved state holds steps 4 and 5
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "cut", reporter=cut, stop_after=5)
    state = json.loads((tmp_path / "cut" / "state" / "instruct" / "state.json").read_text())
    assert state["step"] == 5 and state["loss_window"]["count"] == 2
    train(cfg, tmp_path / "cut", reporter=resumed, resume=True)

    assert [c[0] for c in cut.calls + resumed.calls] == list(range(1, 8))
    assert repr(cut.calls + resumed.calls) == repr(full.calls)  # exactly, nan included
    assert cut.lines() + resumed.lines() == full.lines()
    assert [int(s) for _, s, _, _ in full.lines()] == [3, 6, 7]

    def recorded(run):
        s = json.loads((tmp_path / run / "metrics.json").read_text())["stages"]["instruct"]
        curve = [{k: v for k, v in point.items() if k != "seconds"} for point in s["curve"]]
        return s["final_loss"], s["losses"], curve

    a, b = recorded("full"), recorded("cut")
    assert a == b
    assert [p["step"] for p in a[2]] == [2, 4, 6, 7]
    assert a[2][0]["loss"] is None  # no interval closed yet at step 2
    # each point records the last logged interval's mean, and the final loss is the last interval's
    logged = dict(full.calls)
    assert [p["loss"] for p in a[2][1:]] == [round(logged[s], 4) for s in (4, 6, 7)]
    assert a[0] == round(logged[7], 4)


def test_plain_text_progress_prints_at_the_configured_cadence(data_dir, tmp_path):
    out = io.StringIO()
    rep = ConsoleReporter(Console(file=out, force_terminal=False, width=200))
    train(parse_config(one_stage(data_dir, steps=5, log_every=2)), tmp_path / "run", reporter=rep)
    steps = [m.group(2) for m in map(LINE.match, out.getvalue().splitlines()) if m]
    assert steps == ["2", "4", "5"]
    assert not rep.live
