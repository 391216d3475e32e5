"""Retrieval tasks and training pairs from the shapes world (mmlm.data.shapes_retrieval), checked
against the world's own files (scenes.json, captions.json, questions.jsonl)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmlm.data.pairs import PairsOptions, read_pairs
from mmlm.data.shapes_retrieval import generate_pairs, generate_retrieval
from mmlm.embed.retrieval import read_mmeb

TASKS = ("image_to_caption", "caption_to_image", "vqa", "same_colour", "same_shape")
K = 12  # candidates per query: below the world's 23 distinct answers, so every task can have them all
SIZE = 16


def parse_caption(text: str) -> frozenset:
    """'top left: small red circle; center: big blue square.' -> {(position, size, color, shape)}"""
    out = set()
    for part in text.rstrip(".").split("; "):
        pos, words = part.split(": ")
        size, color, shape = words.split(" ")
        out.add((pos, size, color, shape))
    return frozenset(out)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class World:
    """A generated folder with its world's scenes keyed by image path (relative to the folder)."""

    def __init__(self, root: Path):
        self.root = root
        world = root / "world"
        self.scenes = {f"world/{s['image']}": s for s in json.loads((world / "scenes.json").read_text())}
        self.captions = {
            f"world/{c['image']}": c["conversations"][1]["value"]
            for c in json.loads((world / "captions.json").read_text())
        }
        self.answers = {}
        for q in rows(world / "questions.jsonl"):
            self.answers[(f"world/{q['image']}", q["question"])] = q["answer"]

    def objects(self, image: str) -> frozenset:
        return frozenset((o["position"], o["size"], o["color"], o["shape"]) for o in self.scenes[image]["objects"])


@pytest.fixture(scope="module")
def evald(tmp_path_factory):
    d = tmp_path_factory.mktemp("retrieval")
    info = generate_retrieval(d, n=10, seed=7, candidates=K, image_size=SIZE)
    return d, info, World(d)


@pytest.fixture(scope="module")
def bigd(tmp_path_factory):
    """100 candidates from a 400-scene world: enough negatives that a careless one would show."""
    d = tmp_path_factory.mktemp("retrieval_big")
    generate_retrieval(d, n=40, seed=11, candidates=100, image_size=SIZE)
    return d, None, World(d)


@pytest.fixture(scope="module")
def pairsd(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    info = generate_pairs(d, n=40, seed=8, image_size=SIZE)
    return d, info, World(d)


def test_every_eval_row_has_distinct_candidates_positive_first_and_existing_images(evald):
    d, info, w = evald
    for task in TASKS:
        rs = rows(d / f"{task}.jsonl")
        assert rs, task
        assert info["rows"][task] == len(rs)
        parsed, skipped = read_mmeb(d / f"{task}.jsonl")  # the evaluator reads every row
        assert not skipped and len(parsed) == len(rs)
        for r in rs:
            assert r["subset"] == task
            assert len(r["tgt_text"]) == len(r["tgt_img_path"]) == K
            for p in [r["qry_img_path"], *r["tgt_img_path"]]:
                assert p == "" or (d / p).is_file(), p
            if task in ("image_to_caption", "vqa"):
                assert len(set(r["tgt_text"])) == K and all(r["tgt_text"]) and not any(r["tgt_img_path"])
            else:  # image candidates: distinct files of distinct scenes
                assert all(r["tgt_img_path"]) and not any(r["tgt_text"])
                assert len({w.objects(p) for p in r["tgt_img_path"]}) == K
            if task == "image_to_caption":
                assert r["tgt_text"][0] == w.captions[r["qry_img_path"]]
            elif task == "caption_to_image":
                assert w.captions[r["tgt_img_path"][0]] == r["qry_text"]
            elif task == "vqa":
                assert r["tgt_text"][0] == w.answers[(r["qry_img_path"], r["qry_text"])]
    assert info["short"] == {}


def test_image_to_caption_negatives_never_describe_the_query_scene(bigd):
    d, _, w = bigd
    for r in rows(d / "image_to_caption.jsonl"):
        scene = w.objects(r["qry_img_path"])
        assert parse_caption(r["tgt_text"][0]) == scene  # the parser reads the world's captions
        for neg in r["tgt_text"][1:]:
            assert not parse_caption(neg) <= scene, (neg, r["qry_img_path"])


def test_caption_to_image_negatives_do_not_hold_the_captioned_objects(bigd):
    d, _, w = bigd
    for r in rows(d / "caption_to_image.jsonl"):
        named = parse_caption(r["qry_text"])
        assert all(not named <= w.objects(p) for p in r["tgt_img_path"][1:])


@pytest.mark.parametrize("task,attr", [("same_colour", "color"), ("same_shape", "shape")])
def test_only_the_positive_shares_the_named_attribute(bigd, task, attr):
    d, _, w = bigd
    rs = rows(d / f"{task}.jsonl")
    for r in rs:
        (o,) = w.scenes[r["qry_img_path"]]["objects"]
        has = [any(x[attr] == o[attr] for x in w.scenes[p]["objects"]) for p in r["tgt_img_path"]]
        assert has[0] and not any(has[1:]), r
        assert r["qry_img_path"] not in r["tgt_img_path"]


def test_the_instruction_decides_which_candidate_is_right(evald):
    d, _, _ = evald
    colour = {r["qry_img_path"]: r for r in rows(d / "same_colour.jsonl")}
    shape = {r["qry_img_path"]: r for r in rows(d / "same_shape.jsonl")}
    assert colour.keys() == shape.keys()
    for img, c in colour.items():
        s = shape[img]
        assert c["qry_text"] != s["qry_text"]
        assert c["tgt_img_path"][0] != s["tgt_img_path"][0]
        assert c["tgt_img_path"][0] in s["tgt_img_path"][1:]
        assert s["tgt_img_path"][0] in c["tgt_img_path"][1:]


def test_a_world_with_fewer_distinct_answers_says_so(tmp_path):
    info = generate_retrieval(tmp_path, n=3, seed=1, candidates=30, image_size=SIZE)
    rs = rows(tmp_path / "vqa.jsonl")
    assert {len(set(r["tgt_text"])) for r in rs} == {info["candidates"]["vqa"]}
    assert info["candidates"]["vqa"] < 30 and "vqa" in info["short"]
    assert all(len(r["tgt_text"]) == 30 for r in rows(tmp_path / "image_to_caption.jsonl"))


def test_pairs_parse_with_one_to_three_hard_negatives_unlike_the_positive(pairsd):
    d, info, w = pairsd
    raw = rows(d / "pairs.jsonl")
    recs = read_pairs(PairsOptions(path=str(d / "pairs.jsonl")))
    assert len(recs) == len(raw) == info["total"]
    assert all("error" not in rec.info for rec in recs)
    kinds = {r["id"].split("-")[0] for r in raw}
    assert kinds == set(TASKS)
    for r, rec in zip(raw, recs, strict=True):
        p = rec.pair
        assert set(r) <= {"id", "query", "positive", "negatives", "instruction"}
        assert 1 <= len(p.negatives) <= 3, r
        for it in [p.query, p.positive, *p.negatives]:
            if "image" in it:
                assert (d / it["image"]).is_file()
        pos = p.positive
        for neg in p.negatives:
            assert neg != pos
            if "image" in neg:  # a different picture, not only a different name
                assert (d / neg["image"]).read_bytes() != (d / pos["image"]).read_bytes()
        if r["id"].startswith("image_to_caption"):
            scene = w.objects(p.query["image"])
            assert parse_caption(pos["text"]) == scene
            for neg in p.negatives:
                diff = parse_caption(neg["text"]) ^ scene
                assert len(diff) == 2 and not parse_caption(neg["text"]) <= scene  # one object changed
        if r["id"].startswith(("same_colour", "same_shape")):
            attr = "color" if r["id"].startswith("same_colour") else "shape"
            (o,) = w.scenes[p.query["image"]]["objects"]
            has = [any(x[attr] == o[attr] for x in w.scenes[it["image"]]["objects"]) for it in [pos, *p.negatives]]
            assert has[0] and not any(has[1:])


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        generate_retrieval(out / "eval", n=4, seed=seed, candidates=6, image_size=SIZE)
        generate_pairs(out / "pairs", n=12, seed=seed, image_size=SIZE)
    assert tree(a) == tree(b)
    ta, tc = tree(a), tree(c)
    for f in [*(f"eval/{t}.jsonl" for t in TASKS), "pairs/pairs.jsonl"]:
        assert ta[f] != tc[f], f


def test_cli_writes_tasks_and_pairs(tmp_path):
    from mmlm.cli import app

    runner = CliRunner()
    r = runner.invoke(
        app, ["data", "shapes-retrieval", "--out", str(tmp_path / "e"), "--n", "3", "--seed", "2", "--candidates", "5"]
    )
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "e" / "info.json").read_text())
    assert all(len(rows(tmp_path / "e" / f"{t}.jsonl")) == info["rows"][t] for t in TASKS)
    assert info["rows"]["image_to_caption"] == 3
    r = runner.invoke(
        app, ["data", "shapes-retrieval", "--out", str(tmp_path / "p"), "--n", "9", "--seed", "3", "--pairs"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "info.json").read_text())["total"] == len(rows(tmp_path / "p" / "pairs.jsonl"))
    r = runner.invoke(
        app, ["data", "shapes-retrieval", "--out", str(tmp_path / "x"), "--seed", "1", "--candidates", "1"]
    )
    assert r.exit_code == 2
