"""`mmlm embed`: a JSONL file of items -> .npy / .parquet / .safetensors holding what `model.embed`
gives for the same rows, in order, with their ids; bad rows skipped, named by line and listed."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mmlm
from mmlm.cli import app
from tests.test_embed import model_with

runner = CliRunner()


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A tiny checkpoint whose candidate side writes texts differently from its query side."""
    d = tmp_path_factory.mktemp("embed_ck")
    model_with({"candidate": {"text": "passage: {instruction}{text}"}}).save(d / "ck")
    return d / "ck"


@pytest.fixture(scope="module")
def model(ck):
    return mmlm.load(ck)


def write(folder: Path, lines: list) -> Path:
    """Images red.png / blue.png in ``folder`` and the rows (dicts as JSON, strings as they are)."""
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(folder / "blue.png")
    f = folder / "in.jsonl"
    f.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return f


GOOD = [
    {"id": "a", "text": "a red circle"},
    {"image": "red.png"},
    {"id": 5, "text": "circle", "image": "blue.png", "instruction": "what shape is the object ?"},
    {"text": "blue square top left"},
]


def expected(model, folder: Path, rows: list, **kw) -> torch.Tensor:
    items = [
        {k: (folder / v if k == "image" else v) for k, v in r.items() if k in ("text", "image", "instruction")}
        for r in rows
    ]
    return model.embed(items, **kw)


def read_output(out: Path):
    if out.suffix == ".npy":
        return np.load(out), json.loads(out.with_name(out.stem + ".ids.json").read_text())
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(out)
        return np.array(t.column("vector").to_pylist(), dtype=np.float32), t.column("id").to_pylist()
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        return f.get_tensor("embeddings").numpy(), json.loads(f.metadata()["ids"])


@pytest.mark.parametrize("suffix", [".npy", ".parquet", ".safetensors"])
def test_each_output_format_holds_the_vectors_of_model_embed_in_input_order_with_ids(suffix, ck, model, tmp_path):
    f = write(tmp_path, GOOD)
    out = tmp_path / f"vectors{suffix}"
    r = runner.invoke(app, ["embed", str(ck), "--input", str(f), "--output", str(out), "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    vectors, ids = read_output(out)
    assert vectors.dtype == np.float32 and vectors.shape == (4, model.embedding_width)
    assert np.allclose(vectors, expected(model, tmp_path, GOOD).numpy(), atol=1e-5)
    # the row's id, else its line number; parquet holds one column type, so mixed ids become strings
    assert ids == (["a", "2", "5", "4"] if suffix == ".parquet" else ["a", 2, 5, 4])
    assert "items/s" in r.stderr and not (tmp_path / "vectors.skipped.jsonl").exists()


def test_side_dim_and_instruction_reach_the_model(ck, model, tmp_path):
    rows = [{"text": "a red circle"}, {"text": "circle", "instruction": "own instruction"}]
    f = write(tmp_path, rows)
    out = tmp_path / "v.npy"
    args = ["embed", str(ck), "--input", str(f), "--output", str(out), "--side", "candidate", "--dim", "16"]
    r = runner.invoke(app, [*args, "--instruction", "what shape is the object ?"])
    assert r.exit_code == 0, r.output
    got = np.load(out)
    want = expected(model, tmp_path, rows, side="candidate", dim=16, instruction="what shape is the object ?")
    assert got.shape == (2, 16) and np.allclose(got, want.numpy(), atol=1e-5)
    as_query = expected(model, tmp_path, rows, dim=16, instruction="what shape is the object ?")
    assert not np.allclose(got[0], as_query[0].numpy(), atol=1e-3)  # the candidate template was used


def test_bad_rows_are_skipped_named_by_line_and_listed_and_the_rest_embedded_in_order(ck, model, tmp_path):
    lines = [
        {"id": "first", "text": "a red circle"},
        {"id": "m", "image": "missing.png"},
        {"id": "e"},
        '{"text": "circle"',
        "",  # a blank line is not a row
        {"image": "red.png", "text": "circle"},
    ]
    f = write(tmp_path, lines)
    (tmp_path / "out.skipped.jsonl").write_text("stale\n")
    out = tmp_path / "out.npy"
    r = runner.invoke(app, ["embed", str(ck), "--input", str(f), "--output", str(out), "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    vectors, ids = read_output(out)
    assert ids == ["first", 6]
    assert np.allclose(vectors, expected(model, tmp_path, [lines[0], lines[5]]).numpy(), atol=1e-5)
    assert f"{f}:2 (id m): missing image" in r.stderr
    assert f"{f}:3 (id e): empty row" in r.stderr
    assert f"{f}:4: bad json" in r.stderr
    listed = [json.loads(ln) for ln in (tmp_path / "out.skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["id"], s["reason"]) for s in listed] == [
        (2, "m", "missing image"),
        (3, "e", "empty row"),
        (4, None, "bad json"),
    ]
    assert "missing.png" in listed[0]["message"]


def test_nothing_embedded_exits_2_with_one_line_and_writes_no_vectors(ck, tmp_path):
    f = write(tmp_path, [{"image": "missing.png"}, {}, "[1, 2]"])
    out = tmp_path / "out.safetensors"
    r = runner.invoke(app, ["embed", str(ck), "--input", str(f), "--output", str(out)])
    assert r.exit_code == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no row could be embedded" in errors[0]
    assert not out.exists()
    assert len((tmp_path / "out.skipped.jsonl").read_text().splitlines()) == 3


def test_on_bad_sample_error_stops_at_the_first_bad_row_naming_its_line(ck, tmp_path):
    # line 2's image fails only when its batch is read; line 3's JSON fails on reading: line 2 is first
    f = write(tmp_path, [{"text": "circle"}, {"id": "x", "image": "missing.png"}, "{oops", {"text": "a red circle"}])
    out = tmp_path / "out.npy"
    r = runner.invoke(
        app,
        ["embed", str(ck), "--input", str(f), "--output", str(out), "--on-bad-sample", "error", "--batch-size", "8"],
    )
    assert r.exit_code == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{f}:2 (id x)" in errors[0] and "missing.png" in errors[0], r.stderr
    assert not out.exists() and not (tmp_path / "out.skipped.jsonl").exists()


def test_an_unknown_suffix_or_missing_pyarrow_fails_in_one_line_before_loading(ck, tmp_path, monkeypatch):
    f = write(tmp_path, GOOD)
    r = runner.invoke(app, ["embed", str(tmp_path / "no-such-ck"), "--input", str(f), "--output", "v.csv"])
    assert r.exit_code == 2 and ".npy, .parquet, .safetensors" in r.stderr  # the suffix is checked first
    r = runner.invoke(app, ["embed", str(ck), "--input", str(f), "--output", str(tmp_path / "v.npy"), "--dim", "999"])
    assert r.exit_code == 2 and "--dim 999 is not between 1 and the embedding width 64" in r.stderr
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    r = runner.invoke(app, ["embed", str(ck), "--input", str(f), "--output", str(tmp_path / "v.parquet")])
    assert r.exit_code == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "pip install pyarrow" in errors[0]
