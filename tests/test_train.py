import json

import pytest
import torch
from safetensors.torch import load_file

from mmlm.checkpoint import load
from mmlm.config import parse_config
from mmlm.errors import RunExists, TrainingInterrupted
from mmlm.train.runner import train
from tests.helpers import tiny_config, tiny_raw


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from mmlm.data.shapes import generate

    d = tmp_path_factory.mktemp("shapes")
    generate(d, 40, seed=3, image_size=32)
    return str(d)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_stages_run_in_order_and_end_in_checkpoints(data_dir, tmp_path):
    cfg = tiny_config(data_dir)
    train(cfg, tmp_path / "run")
    for st in ("align", "instruct"):
        assert (tmp_path / "run" / "stages" / st / "mmlm.yaml").is_file()
    assert (tmp_path / "run" / "final").resolve() == (tmp_path / "run" / "stages" / "instruct").resolve()
    init = _weights(tmp_path / "run" / "init")
    align = _weights(tmp_path / "run" / "stages" / "align")
    # stage 1 trains only the connector: the LLM is untouched, the connector moved
    assert torch.equal(init["llm.model.layers.0.mlp.up_proj.weight"], align["llm.model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(init["connectors.image.net.0.weight"], align["connectors.image.net.0.weight"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"align", "instruct"}
    with pytest.raises(RunExists, match="--resume"):
        train(cfg, tmp_path / "run")


def test_interrupted_run_resumes_to_the_same_weights(data_dir, tmp_path):
    # the second stage adds the SEA objective: its per-position draws must resume identically too
    cfg = tiny_config(data_dir, steps=5, objectives=[{"type": "lm"}, {"type": "sea", "weight": 0.5}])
    train(cfg, tmp_path / "full")
    # killed after 3 optimizer steps of the second stage (align has 5): the kill saves nothing, so
    # the state is the periodic save of step 2 (save_every 2) and resuming redoes step 3
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "cut", stop_after=8)
    assert (tmp_path / "cut" / "state" / "instruct" / "state.json").is_file()
    state = json.loads((tmp_path / "cut" / "state" / "instruct" / "state.json").read_text())
    assert state["step"] == 2
    train(cfg, tmp_path / "cut", resume=True)
    a = _weights(tmp_path / "full" / "final")
    b = _weights(tmp_path / "cut" / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (tmp_path / "cut" / "state" / "instruct").exists()


def test_trained_model_loads_and_answers(data_dir, tmp_path):
    from PIL import Image

    cfg = tiny_config(data_dir, steps=2)
    train(cfg, tmp_path / "r")
    m = load(tmp_path / "r" / "final")
    ans = m.ask("what color is the circle?", Image.new("RGB", (32, 32)), max_new_tokens=3)
    assert isinstance(ans, str)
    vocab = set(m.processor.tokenizer.get_vocab())
    assert all(w in vocab for w in ans.split())


def test_worker_processes_feed_the_same_batches(data_dir, tmp_path):
    train(tiny_config(data_dir, steps=3), tmp_path / "w0")
    train(tiny_config(data_dir, steps=3, num_workers=2), tmp_path / "w2")
    wa, wb = _weights(tmp_path / "w0" / "final"), _weights(tmp_path / "w2" / "final")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_ctrl_c_mid_stage_keeps_the_last_step_and_resumes_identically(data_dir, tmp_path):
    from mmlm.train.runner import Silent

    class CtrlC(Silent):
        def step(self, name, step, total, *a):
            if name == "instruct" and step == 3:
                raise KeyboardInterrupt

    cfg = tiny_config(data_dir, steps=5)
    cfg.train.stages[1].save_every = 100  # no periodic save: only the interruption saves
    train(cfg, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", reporter=CtrlC())
    assert json.loads((tmp_path / "cut" / "state" / "instruct" / "state.json").read_text())["step"] == 3
    train(cfg, tmp_path / "cut", resume=True)
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "cut" / "final")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_reproduces_what_the_previous_release_trained(tmp_path):
    """tests/data/legacy-run.connector.safetensors: the final connector of this two-stage run as the
    0.1 release trained it (SEA then a connector active in the second stage; script in
    tests/data/README.md). The same run, SEA now an objective, lands on the same weights: the random
    streams (init, sample order, per-step seeds) and the losses are unchanged."""
    from pathlib import Path

    raw = tiny_raw(str(tmp_path / "shapes"), n=16, steps=3)
    raw["train"]["stages"][1]["objectives"] = [{"type": "lm"}, {"type": "sea", "weight": 0.5, "temperature": 0.1}]
    train(parse_config(raw), tmp_path / "run")
    ours = _weights(tmp_path / "run" / "final")
    theirs = load_file(str(Path(__file__).parent / "data" / "legacy-run.connector.safetensors"))
    assert len(theirs) == 4
    for key, value in theirs.items():
        mine = ours[key.replace("connectors.image.inner.", "connectors.image.")]
        assert torch.allclose(mine, value, rtol=0, atol=1e-5), key
