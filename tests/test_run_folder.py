"""The run folder: nothing is written before the inputs are checked, one process trains in it at a
time, and --resume continues only the run it holds."""

import json
import subprocess
import sys

import pytest
import yaml

from mmlm.config import parse_config
from mmlm.errors import ConfigError, RunExists, TrainingInterrupted
from mmlm.train.runner import train
from tests.helpers import tiny_raw


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


def test_a_run_that_fails_its_checks_writes_nothing(shapes, tmp_path):
    cfg = parse_config(tiny_raw(shapes, n=8, steps=1))
    with pytest.raises(ConfigError, match="no stage named 'nope'"):
        train(cfg, tmp_path / "a", stage="nope")
    raw = tiny_raw(shapes, n=8, steps=1)
    raw["train"]["stages"][1]["data"] = [{"format": "llava", "path": str(tmp_path / "missing.json")}]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        train(parse_config(raw), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    train(cfg, tmp_path / "a", stage="align")  # the corrected command needs no --resume
    assert (tmp_path / "a" / "stages" / "align" / "mmlm.yaml").is_file()


def test_a_second_process_cannot_train_into_a_locked_folder(shapes, tmp_path):
    cfg = parse_config(tiny_raw(shapes, n=8, steps=1))
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mmlm.config import load_config; from mmlm.train.runner import Trainer\n"
            f"t = Trainer(load_config({str(tmp_path / 'cfg.yaml')!r}), {str(tmp_path / 'run')!r}); t.folder.lock()\n"
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunExists, match=f"in use by process {holder.pid}"):
            train(cfg, tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    train(cfg, tmp_path / "run")  # the lock died with its process
    assert (tmp_path / "run" / "final").is_symlink()


def test_resume_refuses_a_changed_config_and_records_harmless_changes(shapes, tmp_path):
    raw = tiny_raw(shapes, n=8, steps=4)
    with pytest.raises(TrainingInterrupted):  # align's 4 steps, then 3 of instruct: its save_every 2 saved step 2
        train(parse_config(raw), tmp_path / "run", stop_after=7)
    assert json.loads((tmp_path / "run" / "state" / "instruct" / "state.json").read_text())["step"] == 2
    changed = tiny_raw(shapes, n=8, steps=4)
    changed["train"]["stages"][1]["lr"] = 2e-3
    changed["model"]["connectors"]["image"]["depth"] = 3
    with pytest.raises(RunExists) as err:
        train(parse_config(changed), tmp_path / "run", resume=True)
    msg = str(err.value)
    assert "2 key(s) differ" in msg and "train.stages.1.lr: 0.001 -> 0.002" in msg
    assert "model.connectors.image.depth: 2 -> 3" in msg
    harmless = tiny_raw(shapes, n=8, steps=4)
    harmless["train"]["threads"] = 1
    harmless["train"]["stages"][1]["save_every"] = 1
    train(parse_config(harmless), tmp_path / "run", resume=True)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["train"]["threads"] == 1 and recorded["train"]["stages"][1]["save_every"] == 1
    assert recorded["train"]["stages"][1]["lr"] == 1e-3
