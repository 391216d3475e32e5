"""A synthetic video world beside the shapes and tones worlds: short clips of one coloured shape on
a white ground that moves in one direction or appears or disappears partway, with captions and
questions (LLaVA rows with ``"video"``: a folder of frame images).

- event: ``left``, ``right``, ``up`` or ``down`` (the shape, 30-40% of the frame's side, travels a
  third to a half of the frame from a random start, at constant speed), or ``appears`` /
  ``disappears`` (the shape stands still and is absent before / after a frame between the third
  and the third-to-last);
- shape: ``circle``, ``square`` or ``triangle``; colour: the shapes world's six.

Questions, by type: ``direction`` ("which way does the shape move?", moving clips),
``event`` ("does the shape appear or disappear?", the others), ``clip_shape`` ("what shape is
it?") and ``clip_color`` ("what color is it?"); the types are named apart from the shapes world's
so that a model trained on both worlds is scored on each.

``generate(out, n, seed)`` writes ``clips/<id>/frame_NN.png``, ``captions.json`` and ``qa.json``
(LLaVA rows), ``questions.jsonl`` (one question per line with its type and answer) and
``clips.json`` (each clip's parameters and the shape's box in every frame), deterministic by seed;
use disjoint seeds for held-out splits. The ``clips`` data format also gives each clip
``query_labels`` (``query_labels``): a word per connector output token, for the ``sea`` objective."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmlm.data.shapes import COLORS, SHAPES, _draw
from mmlm.modalities import VIDEO_PLACEHOLDER

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENTS = (*DIRECTIONS, "appears", "disappears")
QUESTIONS = {
    "direction": "which way does the shape move?",
    "event": "does the shape appear or disappear?",
    "clip_shape": "what shape is it?",
    "clip_color": "what color is it?",
}


def plan(rng: np.random.Generator, size: int = 48, frames: int = 8) -> dict:
    """A clip's parameters: event, shape, colour, side, and the shape's box in each frame (None
    where it is absent)."""
    event = str(EVENTS[int(rng.integers(len(EVENTS)))])
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    side = int(rng.integers(round(size * 0.3), round(size * 0.4) + 1))
    lo, hi = side / 2, size - side / 2  # where the centre may be with the shape inside the frame
    centres: list[tuple[float, float] | None]
    if event in DIRECTIONS:
        dx, dy = DIRECTIONS[event]
        travel = float(rng.uniform(0.33, 0.5)) * size
        start = float(rng.uniform(lo, hi - travel))  # along the axis, in the direction of travel
        across = float(rng.uniform(lo, hi))
        steps = [start + travel * t / (frames - 1) for t in range(frames)]
        along = [s if dx + dy > 0 else size - s for s in steps]
        centres = [(a, across) if dx else (across, a) for a in along]
        change = None
    else:
        cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        change = int(rng.integers(2, frames - 1))  # first frame of the new state: 2 .. frames-2
        shown = [(t >= change) == (event == "appears") for t in range(frames)]
        centres = [(cx, cy) if s else None for s in shown]
    boxes = [
        None
        if c is None
        else [
            int(round(c[0] - side / 2)),
            int(round(c[1] - side / 2)),
            int(round(c[0] + side / 2)) - 1,
            int(round(c[1] + side / 2)) - 1,
        ]
        for c in centres
    ]
    return {"event": event, "shape": shape, "color": color, "side": side, "change": change, "boxes": boxes}


def render(p: dict, size: int = 48) -> list[Image.Image]:
    """The clip's frames: the shape drawn at its box on white, or white alone where it is absent."""
    frames = []
    for box in p["boxes"]:
        img = Image.new("RGB", (size, size), (255, 255, 255))
        if box is not None:
            _draw(ImageDraw.Draw(img), p["shape"], tuple(box), COLORS[p["color"]])
        frames.append(img)
    return frames


def caption(p: dict) -> str:
    verb = f"moves {p['event']}" if p["event"] in DIRECTIONS else p["event"]
    return f"a {p['color']} {p['shape']} {verb}."


def questions(p: dict) -> list[dict]:
    """The clip's three questions: how it changes (direction or event), its shape, its colour."""
    kind = "direction" if p["event"] in DIRECTIONS else "event"
    answers = {kind: p["event"], "clip_shape": p["shape"], "clip_color": p["color"]}
    return [{"type": t, "question": QUESTIONS[t], "answer": a} for t, a in answers.items()]


QUERY_GRIDS = (2, 3, 4, 5, 6, 8)  # token counts (their squares) the query labels are written for


def query_labels(p: dict, m: int) -> list[str]:
    """A word per output token of a connector that gives ``m`` tokens per clip, for token-level
    alignment (the ``sea`` objective with ``label_key: query_labels``): three eighths of the tokens
    are labelled with what happens (the direction or the event), three eighths with the shape and the
    rest with the colour (the easiest fact); so each learned query is pinned to one fact of the clip."""
    n_event = max(1, m * 3 // 8)
    n_shape = min(m - n_event, max(1, m * 3 // 8))
    return [p["event"]] * n_event + [p["shape"]] * n_shape + [p["color"]] * (m - n_event - n_shape)


def generate(out: str | Path, n: int, seed: int = 0, image_size: int = 48, frames: int = 8) -> dict:
    out = Path(out)
    clips, captions, qa, flat = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        p = plan(rng, image_size, frames)
        name = f"clips/{seed}_{i:06d}"
        (out / name).mkdir(parents=True, exist_ok=True)
        for t, img in enumerate(render(p, image_size)):
            img.save(out / name / f"frame_{t:02d}.png")
        cid = f"{seed}-{i}"
        clips.append({"id": cid, "video": name, **p})
        human = f"{VIDEO_PLACEHOLDER}\ndescribe the video."
        captions.append(
            {
                "id": cid,
                "video": name,
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption(p)}],
            }
        )
        qs = [questions(p)[int(k)] for k in rng.permutation(3)]
        conv = []
        for k, q in enumerate(qs):
            conv.append({"from": "human", "value": (f"{VIDEO_PLACEHOLDER}\n" if k == 0 else "") + q["question"]})
            conv.append({"from": "gpt", "value": q["answer"]})
            flat.append({"id": f"{cid}-{k}", "video": name, **q})
        qa.append({"id": cid, "video": name, "conversations": conv, "question_types": [q["type"] for q in qs]})
    (out / "clips.json").write_text(json.dumps(clips, indent=1))
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    (out / "qa.json").write_text(json.dumps(qa, indent=1))
    with open(out / "questions.jsonl", "w") as f:
        for row in flat:
            f.write(json.dumps(row) + "\n")
    info = {
        "seed": seed,
        "n": n,
        "image_size": image_size,
        "frames": frames,
        "questions": len(flat),
        "by_type": {t: sum(q["type"] == t for q in flat) for t in QUESTIONS},
    }
    (out / "world.json").write_text(json.dumps(info, indent=1))
    return info
