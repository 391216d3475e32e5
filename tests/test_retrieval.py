"""Retrieval evaluation: metrics equal a hand computation (ties count against the positive), MMEB's
layout is read with every unusable row counted and named, `mmlm eval --task retrieval` ranks an
exact-match positive first, and the MTEB 2 adapter gives the vectors of `model.embed`."""

import json
import math
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mmlm
from mmlm.cli import app
from mmlm.embed.mteb import MTEBModel
from mmlm.embed.retrieval import positive_ranks, read_mmeb, retrieval_metrics
from tests.test_embed import model_with

runner = CliRunner()

SCORES = [
    [0.9, 0.1, 0.5],  # rank 1
    [0.2, 0.8, 0.2, 0.1],  # 0.8 above, 0.2 tied: rank 3
    [0.3] * 6,  # constant: every other candidate ties, rank 6
    [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.12, 0.11],  # last of 12: rank 12, outside nDCG@10
]


def test_metrics_equal_a_hand_computation_and_ties_count_against_the_positive():
    assert positive_ranks(SCORES) == [1, 3, 6, 12]
    m = retrieval_metrics(SCORES)
    assert m["n"] == 4
    assert m["precision@1"] == pytest.approx(1 / 4)
    assert m["recall@5"] == pytest.approx(2 / 4)  # ranks 1 and 3
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(4) + 1 / math.log2(7)) / 4)
    assert m["ndcg@10"] == pytest.approx(0.464051797)  # (1 + 0.5 + 0.356207187) / 4
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6 + 1 / 12) / 4)
    constant = retrieval_metrics(torch.full((3, 5), 0.7))  # a score matrix of a model that says nothing
    assert constant["precision@1"] == 0 and constant["recall@5"] == 1 and constant["mrr"] == pytest.approx(1 / 5)


def red(folder: Path, name: str = "red.png", colour=(200, 30, 30)) -> str:
    Image.new("RGB", (32, 32), colour).save(folder / name)
    return name


def test_mmeb_rows_are_read_from_a_json_list_with_unusable_rows_named(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = [
        {"qry_text": "<|image_1|>\nwhat shape ?", "qry_img_path": "q.png", "tgt_text": ["circle", "square"],
         "tgt_img_path": ["", ""], "dataset": "VQA"},
        {"qry_text": "", "qry_img_path": "", "tgt_text": ["circle"], "tgt_img_path": [""], "dataset": "VQA"},
        {"qry_text": "circle", "tgt_img_path": ["a.png", "b.png"]},  # image-only candidates, no tgt_text
        {"qry_text": "circle", "tgt_text": [], "tgt_img_path": []},
        {"qry_text": "circle", "tgt_text": ["a", ""], "tgt_img_path": ["", ""]},
        {"qry_text": "circle", "tgt_text": ["a", "b"], "tgt_img_path": ["x.png"]},
        "not a row",
    ]  # fmt: skip
    f = tmp_path / "Shapes-Test.json"
    f.write_text(json.dumps(rows))
    good, skipped = read_mmeb(f, image_root=images)
    assert [r.index for r in good] == [0, 2]
    assert good[0].query == ("what shape ?", str(images / "q.png"))  # Phi-3-V's image token removed
    assert good[0].candidates == [("circle", None), ("square", None)] and good[0].subset == "VQA"
    assert good[1].candidates == [("", str(images / "a.png")), ("", str(images / "b.png"))]
    assert good[1].subset == "Shapes-Test"  # no subset key: the file's name
    assert [(s.index, s.reason) for s in skipped] == [
        (1, "empty query"),
        (3, "no candidates"),
        (4, "empty candidate"),
        (5, "bad format"),
        (6, "bad format"),
    ]
    assert skipped[0].where == f"{f}[1]" and "candidate 1" in skipped[2].message


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A tiny checkpoint with the default templates: the same for queries and candidates."""
    d = tmp_path_factory.mktemp("retrieval_ck")
    model_with().save(d / "ck")
    return d / "ck"


def test_eval_retrieval_ranks_the_exact_match_first_and_names_every_skipped_row(ck, tmp_path):
    r_, b_, g_ = red(tmp_path), red(tmp_path, "blue.png", (30, 30, 200)), red(tmp_path, "green.png", (30, 200, 30))
    texts = ["a red circle", "blue square top left", "circle", "what shape is the red object ?"]

    def t2t(i):  # the query's text is the positive's: identical prompts on both sides, cosine 1
        return {
            "qry_text": texts[i],
            "qry_img_path": "",
            "tgt_text": texts[i:] + texts[:i],
            "tgt_img_path": [""] * 4,
            "subset": "t2t",
        }

    rows = [
        t2t(0),
        t2t(1),
        {"qry_text": "", "qry_img_path": r_, "tgt_text": ["", "", ""], "tgt_img_path": [r_, b_, g_], "subset": "i2i"},
        {"qry_text": "", "qry_img_path": g_, "tgt_text": ["", "", ""], "tgt_img_path": [g_, r_, b_], "subset": "i2i"},
        {"qry_text": "circle", "qry_img_path": b_, "tgt_text": ["circle", "circle", "a red circle"],
         "tgt_img_path": [b_, r_, b_], "subset": "i2i"},
        {"qry_text": "", "qry_img_path": "", "tgt_text": texts, "tgt_img_path": [""] * 4, "subset": "t2t"},
        {"qry_text": "circle", "qry_img_path": "", "tgt_text": ["circle", "square"],
         "tgt_img_path": ["", "gone.png"], "subset": "t2t"},
        t2t(2),
    ]  # fmt: skip
    f = tmp_path / "mmeb.jsonl"
    f.write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:5]) + "{broken\n" + "".join(json.dumps(r) + "\n" for r in rows[5:])
    )
    out = tmp_path / "metrics.json"
    r = runner.invoke(
        app, ["eval", str(ck), "--task", "retrieval", "--data", str(f), "--out", str(out), "--batch-size", "3"]
    )
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["overall"]["n"] == 6 and m["overall"]["precision@1"] == 1.0 and m["overall"]["mrr"] == 1.0
    assert m["subsets"]["t2t"]["n"] == 3 and m["subsets"]["i2i"]["n"] == 3
    assert m["subsets"]["t2t"]["skipped"] == 2 and m["macro"]["precision@1"] == 1.0
    named = [(s["where"], s["reason"]) for s in m["skipped"]["rows"]]
    assert named == [(f"{f}:6", "bad json"), (f"{f}:7", "empty query"), (f"{f}:8", "missing image")]
    assert "candidate 1" in m["skipped"]["rows"][2]["message"] and m["skipped"]["count"] == 3
    # each distinct (text, image) candidate once: 4 texts, 3 images, 3 image+text pairs, the unreadable one
    assert m["distinct_candidates"] == 4 + 3 + 3 + 1
    assert "P@1" in r.stdout and "nDCG@10" in r.stdout and f"{f}:7" in r.stderr


def test_constant_vectors_score_nothing_in_eval(ck, tmp_path, monkeypatch):
    rows = [{"qry_text": "circle", "tgt_text": ["circle", "a red circle", "blue square top left"]}] * 2
    f = tmp_path / "mmeb.json"
    f.write_text(json.dumps(rows))
    monkeypatch.setattr(mmlm.MultimodalLM, "embed", lambda self, items, **kw: torch.ones(len(items), 4) / 2)
    out = tmp_path / "m.json"
    r = runner.invoke(app, ["eval", str(ck), "--task", "retrieval", "--data", str(f), "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())["overall"]
    assert m["precision@1"] == 0 and m["mrr"] == pytest.approx(1 / 3)


def test_eval_retrieval_with_no_usable_row_exits_2_after_naming_them(ck, tmp_path):
    f = tmp_path / "mmeb.jsonl"
    f.write_text(json.dumps({"qry_text": "", "tgt_text": ["circle"]}) + "\n")
    out = tmp_path / "m.json"
    r = runner.invoke(app, ["eval", str(ck), "--task", "retrieval", "--data", str(f), "--out", str(out)])
    assert r.exit_code == 2 and "no row could be evaluated" in r.stderr
    assert json.loads(out.read_text())["skipped"]["by_reason"] == {"empty query": 1}


class PromptType(str, Enum):  # MTEB 2's enum, as the harness passes it
    query = "query"
    document = "document"


def test_mteb_adapter_gives_the_vectors_of_embed_for_each_prompt_type():
    model = model_with({"candidate": {"text": "passage: {instruction}{text}"}})
    img, img2 = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))
    batches = [
        {"text": ["a red circle", "circle"]},
        {"image": [img, img2]},
        {"text": ["circle", "a"], "image": [img, img2]},
    ]
    items = ["a red circle", "circle", img, img2, {"text": "circle", "image": img}, {"text": "a", "image": img2}]
    adapter = MTEBModel(model, batch_size=2)
    meta = type("TaskMetadata", (), {"name": "Shapes"})()
    for prompt_type, side in ((PromptType.query, "query"), (PromptType.document, "candidate"), (None, "query")):
        got = adapter.encode(
            iter(batches), task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=prompt_type
        )
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (6, model.embedding_width)
        assert np.allclose(got, model.embed(items, side=side).numpy(), atol=1e-5), prompt_type
    docs = adapter.encode(batches[:1], task_metadata=meta, prompt_type="document")
    assert not np.allclose(docs, adapter.encode(batches[:1], task_metadata=meta, prompt_type="query"), atol=1e-3)
    by_task = MTEBModel(model, instructions={"Shapes": "what shape is the object ?"})
    got = by_task.encode(batches[:1], task_metadata=meta, prompt_type="query")
    assert np.allclose(got, model.embed(items[:2], instruction="what shape is the object ?").numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="prompt_type"):
        adapter.encode(batches[:1], prompt_type="passages")
