"""The clips world: deterministic by seed, every answer true of its frames (the direction read from
where the shape's pixels are in the first and last frames, appear/disappear from which frames are
blank, the colour from the pixels, the shape from how much of its box it fills), rows read by the
clips format into a video model's batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmlm.data.clips import generate
from mmlm.data.shapes import COLORS


def ink(frame: Image.Image) -> np.ndarray:
    """Mask of the pixels that are not the white ground."""
    return (np.asarray(frame.convert("RGB")).astype(int) < 250).any(axis=2)


def read_frames(root, clip) -> list[Image.Image]:
    files = sorted((root / clip["video"]).glob("frame_*.png"))
    return [Image.open(f).convert("RGB") for f in files]


def test_every_answer_is_true_of_its_frames(tmp_path):
    info = generate(tmp_path, 36, seed=5)
    assert info["frames"] == 8 and info["questions"] == 36 * 3
    clips = json.loads((tmp_path / "clips.json").read_text())
    assert {c["event"] for c in clips} == {"left", "right", "up", "down", "appears", "disappears"}
    answers = {}
    for row in map(json.loads, (tmp_path / "questions.jsonl").read_text().splitlines()):
        answers.setdefault(row["video"], {})[row["type"]] = row["answer"]
    for c in clips:
        frames = read_frames(tmp_path, c)
        assert len(frames) == 8 and frames[0].size == (48, 48)
        masks = [ink(f) for f in frames]
        shown = [bool(m.any()) for m in masks]
        got = answers[c["video"]]
        if "direction" in got:
            assert all(shown), c
            (y0, x0), (y1, x1) = (np.argwhere(masks[i]).mean(axis=0) for i in (0, -1))
            dx, dy = x1 - x0, y1 - y0
            seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert seen == got["direction"] and max(abs(dx), abs(dy)) > 10, (c, dx, dy)
        else:
            assert not all(shown) and any(shown), c
            change = shown.index(not shown[0])
            assert 2 <= change <= 6 and shown == [shown[0]] * change + [not shown[0]] * (8 - change), c
            assert got["event"] == ("appears" if shown[-1] else "disappears"), c
        first = next(i for i, s in enumerate(shown) if s)
        pixels = np.asarray(frames[first])[masks[first]]
        color = min(COLORS, key=lambda k: np.abs(pixels.mean(axis=0) - COLORS[k]).sum())
        assert color == got["clip_color"], c
        ys, xs = np.nonzero(masks[first])
        fill = masks[first].sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "square" if fill > 0.93 else "circle" if fill > 0.65 else "triangle"
        assert shape == got["clip_shape"], (c, fill)


def test_the_world_is_deterministic_by_seed(tmp_path):
    for d, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate(tmp_path / d, 4, seed=seed)
    a, b, c = (json.loads((tmp_path / d / "clips.json").read_text()) for d in "abc")
    assert a == b and a != c
    fa = np.asarray(Image.open(tmp_path / "a" / a[0]["video"] / "frame_03.png"))
    fb = np.asarray(Image.open(tmp_path / "b" / b[0]["video"] / "frame_03.png"))
    assert np.array_equal(fa, fb)


def test_the_clips_format_generates_on_first_use_reads_every_task_and_refuses_another_world(tmp_path):
    from mmlm.config import DataSource
    from mmlm.data.sources import read_source

    src = {"format": "clips", "path": str(tmp_path / "w"), "n": 4, "seed": 0, "image_size": 32, "frames": 6}
    recs = read_source(DataSource(**src, task="questions"))
    assert len(recs) == 12 and all(r.videos == [recs[0].videos[0]] for r in recs[:3])
    assert {r.info["question_types"][0] for r in recs} >= {"clip_shape", "clip_color"}
    assert all(r.messages[0]["content"].startswith("<video>\n") for r in recs)  # the placeholder is added
    assert len(list((tmp_path / "w" / recs[0].videos[0]).glob("frame_*.png"))) == 6
    qa = read_source(DataSource(**src, task="qa"))
    assert len(qa) == 4 and sum(m["role"] == "assistant" for m in qa[0].messages) == 3
    for r in qa:  # a word per connector token for sea: 3/8 what happens, 3/8 the shape, the rest the colour
        answers = dict(zip(r.info["question_types"], [m["content"] for m in r.messages[1::2]], strict=True))
        happens = answers.get("direction", answers.get("event"))
        assert (
            r.meta["query_labels"][0]["4"] == [happens] * 6 + [answers["clip_shape"]] * 6 + [answers["clip_color"]] * 4
        )
        assert len(r.meta["query_labels"][0]["3"]) == 9 and len(r.meta["query_labels"]) == len(r.videos) == 1
    caps = read_source(DataSource(**src, task="captions"))
    assert caps[0].messages[1]["content"].split()[0] == "a"
    with pytest.raises(ValueError, match="holds a clips world"):
        read_source(DataSource(**{**src, "frames": 8}))
