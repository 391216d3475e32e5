"""A user's mistakes, as the command line reports them: one line, ``error: <where>: <what>``, exit
status 2, the traceback only behind ``mmlm --debug``; ``config validate`` finds missing files,
unknown model names and trainable patterns that match nothing before anything trains; relative
paths in a config are read from the config file's folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mmlm.cli
from mmlm.check import check_config
from mmlm.cli import app
from mmlm.config import load_config, parse_config
from mmlm.model import build, skeleton
from tests.helpers import tiny_raw

runner = CliRunner()
TEXTS = ["a red circle", "what shape is the red object ?", "circle", "blue square top left"]


def one_error(r, *needles: str, status: int = 2) -> str:
    """The command failed with ``status`` and said one line starting with ``error:`` holding every
    needle; no traceback."""
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == status, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def one_stage(tmp_path, **stage) -> dict:
    raw = tiny_raw(str(tmp_path / "shapes"), n=12, steps=2)
    raw["train"]["stages"] = raw["train"]["stages"][:1]
    raw["train"]["stages"][0].update(stage)
    return raw


# --------------------------------------------------------------------------------------- training


def test_a_trainable_pattern_matching_nothing_is_one_line_naming_the_stage_key(tmp_path):
    f = write(tmp_path / "c.yaml", one_stage(tmp_path, trainable=["connector.*"]))
    line = one_error(runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "run")]))
    assert "train.stages.0.trainable" in line and "connectors.image.*" in line  # the groups that exist
    assert not (tmp_path / "run" / "stages").exists()


def test_an_llm_config_transformers_refuses_is_one_line_naming_model_llm_config(tmp_path):
    raw = one_stage(tmp_path)
    raw["model"]["llm"]["config"]["num_attention_heads"] = 5  # 64 is not a multiple of 5
    f = write(tmp_path / "c.yaml", raw)
    one_error(runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "run")]), "model.llm.config", "(5)")


def test_a_data_file_that_is_not_json_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "rows.json"
    bad.write_text('[{"conversations": [}]')
    f = write(tmp_path / "c.yaml", one_stage(tmp_path, data=[{"format": "llava", "path": str(bad)}]))
    one_error(runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "run")]), str(bad), "not valid JSON")


def test_no_usable_sample_is_one_line_naming_the_stage_data_and_the_reasons(tmp_path):
    rows = [
        {
            "image": "gone.png",
            "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}],
        }
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    f = write(
        tmp_path / "c.yaml",
        one_stage(tmp_path, on_bad_sample="skip", data=[{"format": "llava", "path": str(tmp_path / "rows.json")}]),
    )
    one_error(
        runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "run")]),
        "train.stages.0.data",
        "no usable samples",
        "missing image",
    )


# ------------------------------------------------------------------------------------- checkpoints


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = build(parse_config(tiny_raw()), texts=TEXTS)
    return model.save(tmp_path / "ck")


def test_a_truncated_or_empty_model_file_is_one_line_naming_it(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    one_error(runner.invoke(app, ["ask", str(ckpt), "hi"]), str(f), "truncated or corrupt")
    f.write_bytes(b"")
    one_error(runner.invoke(app, ["ask", str(ckpt), "hi"]), str(f), "0 bytes")


def test_a_tensor_of_another_shape_is_one_line_naming_it(ckpt):
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    tensors["connectors.image.net.0.weight"] = tensors["connectors.image.net.0.weight"][:, :-1].contiguous()
    save_file(tensors, str(f))
    one_error(runner.invoke(app, ["ask", str(ckpt), "hi"]), "connectors.image.net.0.weight", "shape")


@pytest.mark.parametrize(
    ("damage", "needle"),
    [("model: [1\n", "not valid YAML"), ("type: mlp", "unknown connector 'mlpz'")],
)
def test_a_broken_mmlm_yaml_is_one_line_naming_the_file(ckpt, damage, needle):
    f = ckpt / "mmlm.yaml"
    text = f.read_text()
    f.write_text(text.replace("type: mlp", "type: mlpz") if damage == "type: mlp" else text + damage)
    one_error(runner.invoke(app, ["ask", str(ckpt), "hi"]), str(f), needle)


def test_a_checkpoint_without_its_tokenizer_is_one_line_saying_so(ckpt):
    (ckpt / "tokenizer_config.json").unlink()
    one_error(runner.invoke(app, ["ask", str(ckpt), "hi"]), str(ckpt), "no tokenizer")


def test_a_fault_in_mmlm_is_one_line_asking_for_a_report_and_debug_shows_the_traceback(ckpt, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("unexpected thing")

    monkeypatch.setattr("mmlm.checkpoint.load", broken)
    line = one_error(runner.invoke(app, ["ask", str(ckpt), "hi"]), "TypeError", "--debug", status=1)
    assert "unexpected thing" in line
    r = runner.invoke(app, ["--debug", "ask", str(ckpt), "hi"])
    assert isinstance(r.exception, TypeError)  # the traceback is there for whoever asks for it
    monkeypatch.setattr(mmlm.cli, "_debug", {"on": False})


# --------------------------------------------------------------------------------- config validate


def test_validate_reports_missing_files_unknown_models_and_dead_patterns_each_with_its_key(tmp_path):
    raw = one_stage(tmp_path, trainable=["connectors.*", "llm.model.layerz.*"])
    raw["train"]["stages"][0]["data"] = [{"format": "llava", "path": "missing.json"}]
    raw["train"]["stages"].append({**raw["train"]["stages"][0], "name": "two", "trainable": ["connector.*"]})
    raw["model"]["encoders"]["image"]["weights"] = "vit.safetensors"
    f = write(tmp_path / "cfg" / "c.yaml", raw)
    r = runner.invoke(app, ["config", "validate", str(f)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    folder = tmp_path / "cfg"
    assert f"error: train.stages.0.data.0.path: no such file: {folder / 'missing.json'}" in lines
    assert f"error: model.encoders.image.weights: no such file: {folder / 'vit.safetensors'}" in lines
    assert "error: train.stages.0.trainable: 'llm.model.layerz.*' matches no parameter" in lines
    assert any(ln.startswith("error: train.stages.1.trainable: ['connector.*'] matches no parameter") for ln in lines)
    assert not any("train.stages.0.trainable: ['connectors.*'" in ln for ln in lines)  # stage 0 trains something

    raw["model"]["encoders"]["image"].pop("weights")
    raw["model"]["encoders"]["image"]["model_name"] = "vit_no_such_model"
    r = runner.invoke(app, ["config", "validate", str(write(f, raw))])
    assert "error: model.encoders.image: timm has no model 'vit_no_such_model'" in r.output


def test_validate_finds_a_missing_gguf_and_passes_a_good_config_with_counts(tmp_path):
    raw = one_stage(tmp_path)
    raw["model"]["llm"] = {"type": "gguf", "path": "models/smol.gguf"}
    r = runner.invoke(app, ["config", "validate", str(write(tmp_path / "c.yaml", raw))])
    one_error(r, "model.llm.path", str(tmp_path / "models" / "smol.gguf"))
    r = runner.invoke(app, ["config", "validate", str(write(tmp_path / "ok.yaml", one_stage(tmp_path)))])
    assert r.exit_code == 0, r.output
    report = check_config(load_config(tmp_path / "ok.yaml"))
    model = build(load_config(tmp_path / "ok.yaml"), texts=TEXTS)
    trained = [n for n, _ in model.named_parameters() if n.startswith("connectors.")]
    assert report.trainable == {"align": len(trained)} and f"align ({len(trained)} trainable" in r.output


def test_the_skeleton_has_the_parameter_names_and_shapes_of_the_built_model_and_no_memory():
    cfg = parse_config({**tiny_raw(), "model": {**tiny_raw()["model"], "media_position": {"image": "learned"}}})
    real = {n: tuple(p.shape) for n, p in build(cfg, texts=TEXTS).named_parameters()}
    bare = skeleton(cfg)
    shapes = {n: tuple(p.shape) for n, p in bare.named_parameters()}
    assert set(shapes) == set(real) and "media_pos.image" in shapes
    # the vocabulary of a from-scratch tokenizer is fitted on data: only its size may differ
    assert {n: s for n, s in shapes.items() if "embed_tokens" not in n and "lm_head" not in n} == {
        n: s for n, s in real.items() if "embed_tokens" not in n and "lm_head" not in n
    }
    assert all(p.device.type == "meta" for p in bare.parameters())


def test_a_gguf_skeleton_reads_the_architecture_from_the_file_header(smollm2_path, tmp_path):
    raw = tiny_raw()
    raw["model"]["llm"] = {"type": "gguf", "path": str(smollm2_path)}
    names = {n: p for n, p in skeleton(parse_config(raw)).named_parameters()}
    layers = {n.split(".")[3] for n in names if n.startswith("llm.model.layers.")}
    assert len(layers) == 30 and names["llm.model.embed_tokens.weight"].shape == (49152, 576)  # SmolLM2-135M


# ---------------------------------------------------------------------------------- relative paths


def test_relative_paths_are_read_from_the_config_files_folder(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "project" / "configs"
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "project" / "data" / "rows.json").write_text(json.dumps(rows))
    raw = one_stage(tmp_path, data=[{"format": "llava", "path": "../data/rows.json"}])
    raw["train"]["stages"][0]["data"].append({"format": "shapes", "path": "${out}/shapes", "n": 4})
    raw["model"]["llm"] = {"type": "hf", "path": "HuggingFaceTB/SmolLM2-135M"}  # a hub id stays one
    f = write(cfg_dir / "c.yaml", raw)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(f, variables={"out": "runs/x"})
    data = cfg.train.stages[0].data
    assert data[0].options()["path"] == str(tmp_path / "project" / "data" / "rows.json")
    assert data[1].options()["path"] == "runs/x/shapes"  # under the run folder, as given
    assert cfg.model.llm.options()["path"] == "HuggingFaceTB/SmolLM2-135M"
    # a value given with --set is the user's, typed where they stand
    cfg = load_config(f, ["train.stages.0.data.0.path=mine.json"])
    assert cfg.train.stages[0].data[0].options()["path"] == "mine.json"
    # and training really reads the file from the config's folder
    raw["model"]["llm"] = tiny_raw()["model"]["llm"]
    raw["train"]["stages"][0]["data"] = raw["train"]["stages"][0]["data"][:1]
    raw["train"]["stages"][0]["steps"] = 1
    r = runner.invoke(app, ["train", str(write(f, raw)), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "stages" / "align" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------- a quick start


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train"], ["ask", "ck"], ["nosuchcommand"]])
def test_help_and_argument_errors_answer_without_importing_torch(args):
    code = (
        "import sys\n"
        "from mmlm.cli import app\n"
        "try:\n"
        f"    app({args!r})\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('EXIT', code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    last = r.stdout.strip().splitlines()[-1]
    expected = 0 if args[-1] == "--help" else 2
    assert last == f"EXIT {expected} False False", r.stdout + r.stderr


# ------------------------------------------------------------------------------- config reference


def test_the_readme_config_reference_is_the_generated_one_and_covers_every_key():
    from mmlm.config import (
        DataSource,
        EmbeddingConfig,
        EvalConfig,
        ModelConfig,
        PipelineConfig,
        ProcessorConfig,
        PromptSet,
        StageConfig,
        TrainConfig,
    )
    from mmlm.reference import config_reference, section_of
    from mmlm.registry import ALL

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = config_reference()
    assert section_of(readme) == text, "run: mmlm config reference --readme README.md"
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    keys = [r.split("|")[1].strip().strip("`").rsplit(".", 1)[-1] for r in rows]
    schema = (PipelineConfig, ModelConfig, EmbeddingConfig, PromptSet, ProcessorConfig, TrainConfig, StageConfig)
    for model in (*schema, DataSource, EvalConfig):
        for name, field in model.model_fields.items():
            assert field.exclude or (field.alias or name) in keys, (model.__name__, name)
    for registry in ALL.values():
        for entry in registry.entries():
            assert f"`{'format' if registry.kind == 'data format' else 'type'}: {entry.name}`" in text
            for name, field in entry.options.model_fields.items():
                assert (field.alias or name) in keys, (entry.name, name)
    # each key says what it does and its default, so that a user need not read the source
    undocumented = [r.split("|")[1].strip() for r in rows if r.rstrip().endswith("|  |")]
    assert undocumented == []
    assert "| `train.log_every` | int | `50` |" in text and "| `max_grad_norm` | float \\| null | `1.0` |" in text
