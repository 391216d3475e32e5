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
    """100 steps on the world's questions: the loaded checkpoint answers every kind of training
    question with an answer of that kind (an untrained or 2-step model answers '' here), through the
    Python API and through `mmlm ask` alike."""
    from pathlib import Path

    from PIL import Image
    from typer.testing import CliRunner

    from mmlm.cli import app
    from mmlm.data.shapes import COLORS, NUMBER_WORDS, SHAPES

    raw = tiny_raw(data_dir, n=40, steps=100)
    raw["train"]["stages"] = raw["train"]["stages"][1:]
    raw["train"]["stages"][0].update(lr=3e-3, save_every=1000)
    raw["train"]["stages"][0]["data"][0]["task"] = "questions"  # one question per row, as ask puts it
    train(parse_config(raw), tmp_path / "r")
    m = load(tmp_path / "r" / "final")
    valid = {"color": set(COLORS), "shape": set(SHAPES), "count": set(NUMBER_WORDS.values()), "exists": {"yes", "no"}}
    rows = [json.loads(line) for line in (Path(data_dir) / "questions.jsonl").read_text().splitlines()]
    asked = [r for r in rows if r["type"] in valid][:24]
    assert {r["type"] for r in asked} == set(valid)
    answers = [m.ask(r["question"], Image.open(Path(data_dir) / r["image"]), max_new_tokens=3) for r in asked]
    wrong_kind = [(r["question"], a) for r, a in zip(asked, answers, strict=True) if a not in valid[r["type"]]]
    assert not wrong_kind
    # `mmlm ask` prints that answer
    r = asked[0]
    args = ["ask", str(tmp_path / "r" / "final"), "--image", str(Path(data_dir) / r["image"]), r["question"]]
    out = CliRunner().invoke(app, [*args, "--max-new-tokens", "3"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == answers[0] and answers[0] in valid[r["type"]]


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


def _llava_stage_with_one_long_row(tmp_path, policy: str, short_source_first: bool = False) -> tuple:
    """A one-stage run on a LLaVA JSON of short rows and one over-long row (its index only the data
    knows), optionally after another source of short rows."""
    from PIL import Image

    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "img" / "red.png")

    def row(i, question):  # ids that are not the row index: the index in the message is found, not echoed
        return {
            "id": f"q-{chr(97 + i)}",
            "image": "red.png",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "red"}],
        }

    long_at = 3
    rows = [row(i, "what color is the circle?") for i in range(6)]
    rows[long_at] = row(long_at, "what color is the circle? " * 12)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "short.json").write_text(json.dumps(rows[:long_at]))
    raw = tiny_raw(str(tmp_path), steps=3)
    stage = raw["train"]["stages"][0]
    src = {"format": "llava", "path": str(tmp_path / "d.json"), "image_root": str(tmp_path / "img")}
    stage["data"] = [{**src, "path": str(tmp_path / "short.json")}, src] if short_source_first else [src]
    stage["on_bad_sample"] = policy
    stage["batch_size"] = 2
    raw["train"]["stages"] = [stage]
    raw["processor"]["max_length"] = 48  # a short row is ~30 tokens with its 16 image tokens, the long one 94
    return parse_config(raw), long_at


@pytest.mark.parametrize(
    "short_source_first",
    [
        False,
        True,
    ],
)
def test_an_over_long_sample_stops_training_naming_its_file_and_row(tmp_path, short_source_first):
    from mmlm.errors import SampleError

    cfg, long_at = _llava_stage_with_one_long_row(tmp_path, "error", short_source_first)
    with pytest.raises(SampleError) as err:
        train(cfg, tmp_path / "run")
    msg = str(err.value)
    assert err.value.reason == "too long" and "max_length=48" in msg
    assert msg.startswith(f"{tmp_path / 'd.json'}: sample {long_at} "), msg


def test_an_over_long_sample_is_skipped_and_counted_once(tmp_path):
    cfg, _ = _llava_stage_with_one_long_row(tmp_path, "skip")
    train(cfg, tmp_path / "run")  # 3 steps of 2 draw from the 5 short rows more than once
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["align"]["data"]
    assert data["skipped_by_reason"] == {"too long": 1}
    assert data["used"] == 5


def test_a_run_can_start_from_another_runs_checkpoint_with_a_new_pooling(tmp_path):
    import mmlm
    from mmlm.errors import ConfigError

    raw = tiny_raw(str(tmp_path / "shapes"), n=12, steps=2)
    raw["train"]["stages"] = raw["train"]["stages"][:1]
    first = train(parse_config(raw), tmp_path / "first")
    raw["model"]["embedding"] = {"pooling": {"type": "latent_attention", "num_latents": 4, "heads": 2}}
    raw["train"]["init_from"] = str(tmp_path / "first" / "final")
    train(parse_config(raw), tmp_path / "second")
    start = mmlm.load(tmp_path / "second" / "init")
    for name, p in first.named_parameters():  # every weight of the first run, and its tokenizer
        assert torch.equal(start.get_parameter(name), p), name
    assert start.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert "pooler.latents" in dict(start.named_parameters())  # the new pooling, initialised fresh
    raw["model"]["connectors"]["image"]["depth"] = 1
    with pytest.raises(ConfigError, match=r"train\.init_from: .* model\.connectors differ"):
        train(parse_config(raw), tmp_path / "third")


def test_stages_choose_their_own_precision_in_one_process(data_dir, tmp_path):
    """accelerate keeps one mixed-precision setting per process and skips a model it has prepared
    before; a bf16 stage between fp32 ones still runs in bf16 autocast, and neither the next stage
    nor the trained model stays in it."""
    raw = tiny_raw(data_dir, n=40, steps=2)
    raw["train"]["stages"][1]["precision"] = "bf16"
    raw["train"]["stages"].append({**raw["train"]["stages"][0], "name": "again", "precision": "no"})
    seen = []

    def spy(module, args, out):  # the dtype the LLM computes in, forward by forward
        seen.append(out.dtype)

    cfg = parse_config(raw)
    from mmlm.model import build

    torch.manual_seed(0)
    model = build(cfg, texts=TEXTS_OF(cfg))
    hook = model.llm.get_decoder().layers[0].mlp.down_proj.register_forward_hook(spy)
    trained = train(cfg, tmp_path / "run", model=model)
    hook.remove()
    f32, bf16 = torch.float32, torch.bfloat16
    assert seen == [f32, f32, bf16, bf16, f32, f32]  # align, instruct (bf16), again: two steps each
    # the model coming out of training computes in fp32, exactly as the saved checkpoint does
    saved = load(tmp_path / "run" / "final")
    batch = saved.processor.collate([saved.processor.encode([{"role": "user", "content": "red circle"}])])
    with torch.no_grad():
        out = trained(**trained.inputs(batch)).logits
        assert out.dtype == f32
        torch.testing.assert_close(out, saved(**saved.inputs(batch)).logits, rtol=0, atol=0)


def TEXTS_OF(cfg):
    from mmlm.data.sources import read_source

    return [t for st in cfg.train.stages for src in st.data for r in read_source(src) for t in r.texts()]
