"""The command line as a user runs it: validate, list, data, train, ask, eval."""

import json
import math

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import mmlm
from mmlm.cli import app
from tests.helpers import tiny_raw

runner = CliRunner()


def test_config_validate_reports_key_path(tmp_path):
    raw = tiny_raw(str(tmp_path / "d"))
    raw["model"]["connectors"]["image"]["type"] = "linear"
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(raw))
    r = runner.invoke(app, ["config", "validate", str(f)])
    assert r.exit_code == 2
    assert "model.connectors.image.type" in r.output and "qformer" in r.output
    r = runner.invoke(app, ["config", "validate", str(f), "--set", "model.connectors.image.type=mlp"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["config", "show", str(f), "--set", "model.connectors.image.type=qformer"])
    assert r.exit_code == 2 and "model.connectors.image.depth" in r.output  # an MLP option on a Q-Former
    r = runner.invoke(
        app, ["config", "show", str(f), "--set", "model.connectors.image={type: qformer, num_queries: 4}"]
    )
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.output)["model"]["connectors"]["image"]
    assert shown == {"type": "qformer", "num_queries": 4}


def test_list_prints_every_registry():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0
    for name in (
        "timm",
        "open_clip",
        "hf",
        "frames",
        "clips",
        "mlp",
        "qformer",
        "resampler",
        "pixel_shuffle",
        "alignvlm",
        "ovis",
        "scratch",
        "gguf",
        "llava",
        "shapes",
        "lm",
        "sea",
        "last",
        "latent_attention",
    ):
        assert f"  {name} " in r.output, name
    sections = [line for line in r.output.splitlines() if line and not line.startswith(" ")]
    assert sections == ["encoders", "connectors", "llm sources", "data formats", "objectives", "poolings", "reducers"]


CONNECTORS = {
    "mlp": {"type": "mlp"},
    "qformer": {"type": "qformer", "num_queries": 4},
    "resampler": {"type": "resampler", "num_latents": 4},
    "pixel_shuffle": {"type": "pixel_shuffle", "scale": 2},
    "alignvlm": {"type": "alignvlm"},
    "ovis": {"type": "ovis", "vocab_size": 64},
    "mlp+sea": {"type": "mlp"},  # with the sea objective in both stages
}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    r = runner.invoke(app, ["data", "shapes", "--out", str(d), "--n", "24", "--seed", "9", "--image-size", "32"])
    assert r.exit_code == 0, r.output
    return d


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_every_connector_trains_through_mmlm_train_and_answers_through_ask(name, shapes_dir, tmp_path):
    raw = tiny_raw(str(shapes_dir), n=24, steps=2)
    for st in raw["train"]["stages"]:
        st["data"][0]["seed"] = 9
        st["trainable"] = ["*"]
        if name.endswith("+sea"):
            st["objectives"] = [{"type": "lm"}, {"type": "sea", "weight": 0.5}]
    raw["model"]["connectors"]["image"] = CONNECTORS[name]
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(f), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "final" / "model.safetensors").is_file()
    losses = json.loads((out / "metrics.json").read_text())["stages"]["instruct"]["losses"]
    assert set(losses) == ({"lm", "sea"} if name.endswith("+sea") else {"lm"})
    img = sorted((shapes_dir / "images").glob("*.png"))[0]
    r = runner.invoke(
        app, ["ask", str(out / "final"), "--image", str(img), "what color is the circle?", "--max-new-tokens", "3"]
    )
    assert r.exit_code == 0, r.output
    # the command prints what the checkpoint answers through the Python API
    expected = mmlm.load(out / "final").ask("what color is the circle?", Image.open(img), max_new_tokens=3)
    assert r.output.strip() == expected
    # the same run directory cannot be started twice by accident
    r = runner.invoke(app, ["train", str(f), "--out", str(out)])
    assert r.exit_code == 2 and "--resume" in r.output


@pytest.mark.parametrize("name", ["tome", "visionzip", "fastv", "aim"])
def test_every_reducer_trains_through_mmlm_train_and_switches_through_ask(name, shapes_dir, tmp_path):
    raw = tiny_raw(str(shapes_dir), n=24, steps=2)
    raw["model"]["llm"]["config"]["num_hidden_layers"] = 3
    reduction = {"type": name, "keep": 0.5, **({"layer": 1} if name == "fastv" else {})}
    raw["model"]["token_reduction"] = {"image": reduction}
    for st in raw["train"]["stages"]:
        st["data"][0]["seed"] = 9
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(f), "--out", str(out)])
    assert r.exit_code == 0, r.output
    losses = json.loads((out / "metrics.json").read_text())["stages"]["instruct"]["losses"]
    assert all(math.isfinite(v) for v in losses.values())
    trained = mmlm.load(out / "final")
    assert trained.config.model.token_reduction["image"].type == name  # the checkpoint keeps its reducer
    img = sorted((shapes_dir / "images").glob("*.png"))[0]
    q = "what color is the circle?"
    sets = ["--set", "model.token_reduction.image.keep=0.25"]
    r = runner.invoke(app, ["ask", str(out / "final"), "--image", str(img), q, "--max-new-tokens", "3", *sets])
    assert r.exit_code == 0, r.output
    switched = mmlm.load(out / "final", overrides=("model.token_reduction.image.keep=0.25",))
    assert r.output.strip() == switched.ask(q, Image.open(img), max_new_tokens=3)
    merges = name != "fastv"
    n = trained.processor.media["image"].num_tokens
    assert switched.processor.media["image"].num_tokens == (n // 2 if merges else n)


def test_eval_counts_every_question_and_writes_metrics(shapes_dir, tmp_path):
    raw = tiny_raw(str(shapes_dir), n=24, steps=1)
    for st in raw["train"]["stages"]:
        st["data"][0]["seed"] = 9
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "run")]).exit_code == 0
    qfile = shapes_dir / "questions.jsonl"
    n = len(qfile.read_text().splitlines())
    r = runner.invoke(
        app,
        [
            "eval",
            str(tmp_path / "run" / "final"),
            "--data",
            str(qfile),
            "--image-root",
            str(shapes_dir),
            "--out",
            str(tmp_path / "m.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_eval"] == n
    assert set(m["by_type"]) == {"color", "shape", "count", "position", "exists"}
    assert sum(m["n_by_type"].values()) == n
    preds = m["predictions"]
    assert len(preds) == n and {p["type"] for p in preds} == set(m["by_type"])
    assert sum(p["correct"] for p in preds) == round(m["vqa_accuracy"] * n)
    # beside the accuracy, every question asked again with another sample's image
    use = m["image_use"]
    assert use["n_eval"] == n and use["tokens"] > n and set(use["by_type_shuffled"]) == set(m["by_type"])
    assert "image use: answer loss" in r.output and "with another sample's image" in r.output
    # questions without a type: one "all" row, not two
    untyped = tmp_path / "untyped.jsonl"
    untyped.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k != "type"}) + "\n"
            for line in qfile.read_text().splitlines()[:5]
        )
    )
    r = runner.invoke(
        app, ["eval", str(tmp_path / "run" / "final"), "--data", str(untyped), "--image-root", str(shapes_dir)]
    )
    assert r.exit_code == 0, r.output
    assert [line.split()[1] for line in r.output.splitlines() if "│ all" in line] == ["all"]


def test_stage_runs_one_stage_into_an_existing_run(shapes_dir, tmp_path):
    raw = tiny_raw(str(shapes_dir), n=24, steps=2)
    for st in raw["train"]["stages"]:
        st["data"][0]["seed"] = 9
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "run")]).exit_code == 0
    before = (tmp_path / "run" / "stages" / "align" / "model.safetensors").read_bytes()
    r = runner.invoke(
        app, ["train", str(f), "--out", str(tmp_path / "run"), "--stage", "instruct", "--set", "train.threads=1"]
    )
    assert r.exit_code == 0, r.output
    assert "stage instruct" in r.output and "stage align" not in r.output
    assert (tmp_path / "run" / "stages" / "align" / "model.safetensors").read_bytes() == before
    r = runner.invoke(
        app,
        [
            "train",
            str(f),
            "--out",
            str(tmp_path / "run"),
            "--stage",
            "instruct",
            "--set",
            "train.stages.instruct.lr=0.5",
        ],
    )
    assert r.exit_code == 2 and "train.stages.1.lr: 0.001 -> 0.5" in r.output


def test_the_smollm2_demo_trains_the_pretrained_llm_with_lora_and_reports_image_use(smollm2_path, tmp_path):
    """`mmlm demo --llm smollm2`, shortened by --set: the shipped recipe end to end (SmolLM2 from its
    GGUF file, alignment without the LLM, LoRA instruction tuning in bf16, the held-out table with the
    image-use check). The checkpoint keeps the LLM by reference: adapters, not SmolLM2's weights."""
    from safetensors.torch import load_file

    short = [
        "train.stages.0.steps=2",
        "train.stages.0.data.0.n=8",
        "train.stages.1.steps=2",
        "train.stages.1.batch_size=2",
        "train.stages.1.eval_every=1",
        "train.stages.1.data.0.n=8",
        "train.eval.data.0.n=3",
        "train.eval.max_questions=12",  # questions about more than one image: the image-use check has donors
    ]
    args = ["demo", "--llm", "smollm2", "--out", str(tmp_path / "run")]
    r = runner.invoke(app, args + [a for s in short for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(m["stages"]) == {"align", "vqa"} and m["n_eval"] >= 10
    assert m["stages"]["align"]["losses"].keys() == {"sea", "sea_norm"}  # the stage that never runs the LLM
    use = m["image_use"]
    assert use["n_eval"] == m["n_eval"] and use["loss"] > 0 and use["loss_shuffled"] > 0
    assert [p["step"] for p in m["curve"]] == [1, 2] and all("shuffled_accuracy" in p for p in m["curve"])
    assert "with another sample's image" in r.output and "image use: answer loss" in r.output
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    llm = [k for k in saved if k.startswith("llm.")]
    assert llm and all(".lora_" in k for k in llm), llm[:5]
    # the SmolLM2 recipe is the image recipe: other modalities are refused, naming the options
    r = runner.invoke(app, ["demo", "--llm", "smollm2", "--audio", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--llm smollm2" in r.output and "--audio" in r.output
