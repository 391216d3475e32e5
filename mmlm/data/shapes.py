"""The shapes world: a synthetic visual question answering task with a known answer to everything.

Each image holds 1-3 objects on a 3x3 grid; an object has a shape (circle, square, triangle), a
colour (6) and a size (small, big), and is jittered inside its cell. For every image the world writes
a caption, VQA questions of five types (colour of a shape, shape of a colour, count, position,
existence yes/no balanced) with one- or two-word answers, and per-patch ground-truth labels (the word
of the object covering most of each patch, or "background") for token-level alignment.

Deterministic by seed: image ``i`` of seed ``s`` depends on ``(s, i)`` only. Held-out splits use
disjoint seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmlm.modalities import IMAGE_PLACEHOLDER

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (250, 135, 30),
}
SIZES = {"small": 0.45, "big": 0.85}  # fraction of the cell
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
QUESTION_TYPES = ("color", "shape", "count", "position", "exists")
PATCH_GRIDS = (2, 3, 4, 6, 8, 12)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # 0..8 row-major
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def words(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "position": self.position,
            "cell": self.cell,
            "box": list(self.box),
        }


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render_scene(rng: np.random.Generator, image_size: int = 96):
    """Draw one scene; returns (image, objects, label map of object index + 1 per pixel)."""
    n = int(rng.integers(1, 4))
    cells = rng.choice(9, size=n, replace=False)
    cell_px = image_size / 3
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    labels = Image.new("L", (image_size, image_size), 0)
    d, dl = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    objs = []
    for k, cell in enumerate(sorted(int(c) for c in cells)):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        side = SIZES[size] * cell_px
        slack = (cell_px - side) / 2
        r, c = divmod(cell, 3)
        cx = (c + 0.5) * cell_px + rng.uniform(-slack, slack) * 0.8
        cy = (r + 0.5) * cell_px + rng.uniform(-slack, slack) * 0.8
        box = (
            int(round(cx - side / 2)),
            int(round(cy - side / 2)),
            int(round(cx + side / 2)) - 1,
            int(round(cy + side / 2)) - 1,
        )
        _draw(d, shape, box, COLORS[color])
        _draw(dl, shape, box, k + 1)
        objs.append(Obj(shape, color, size, cell, box))
    return img, objs, np.asarray(labels)


def patch_objects(label_map: np.ndarray, n_objects: int, grid: int, min_cover: float = 0.1) -> list[int]:
    """Per patch of a ``grid x grid`` split: 1 + the index of the object covering most of the
    patch, or 0 (background) when no object covers ``min_cover`` of the patch or a third of
    its own area there (so a small object is never lost in a large patch)."""
    H = label_map.shape[0]
    step = H / grid
    area = np.bincount(label_map.ravel(), minlength=n_objects + 1)
    out = []
    for r in range(grid):
        for c in range(grid):
            patch = label_map[int(r * step) : int((r + 1) * step), int(c * step) : int((c + 1) * step)]
            counts = np.bincount(patch.ravel(), minlength=n_objects + 1)
            counts[0] = 0
            k = int(counts.argmax())
            enough = counts[k] >= min(min_cover * patch.size, area[k] / 3)
            out.append(k if counts[k] > 0 and enough else 0)
    return out


_WORDS: dict[str, str] = {}


def label_words(objects: list[dict], indices: list[int]) -> list[str]:
    """Word labels ("red circle", "background") for per-patch object indices (strings interned)."""
    words = ["background"] + [f"{o['color']} {o['shape']}" for o in objects]
    return [_WORDS.setdefault(words[i], words[i]) for i in indices]


def patch_labels(objs: list[Obj], label_map: np.ndarray, grid: int, min_cover: float = 0.1) -> list[str]:
    """Word label per patch of a ``grid x grid`` split: the object covering most of the patch
    ("red circle"), or "background" when no object covers ``min_cover`` of it."""
    return label_words([o.to_dict() for o in objs], patch_objects(label_map, len(objs), grid, min_cover))


def caption(objs: list[Obj]) -> str:
    # position first: the describer names a place, then what is there (row-major order)
    return "; ".join(f"{o.position}: {o.words()}" for o in objs) + "."


def _unique(objs, key):
    vals = [key(o) for o in objs]
    return [o for o in objs if vals.count(key(o)) == 1]


def questions(objs: list[Obj], rng: np.random.Generator, want_yes: bool) -> list[dict]:
    """One question of each type that has a unique answer for this scene."""
    qs = []
    # colour of a shape (qualified by size when the shape alone is ambiguous)
    uniq = _unique(objs, lambda o: o.shape)
    if uniq:
        o = uniq[int(rng.integers(len(uniq)))]
        qs.append({"type": "color", "question": f"what color is the {o.shape}?", "answer": o.color})
    else:
        uniq = _unique(objs, lambda o: (o.size, o.shape))
        if uniq:
            o = uniq[int(rng.integers(len(uniq)))]
            qs.append({"type": "color", "question": f"what color is the {o.size} {o.shape}?", "answer": o.color})
    # shape of a colour
    uniq = _unique(objs, lambda o: o.color)
    if uniq:
        o = uniq[int(rng.integers(len(uniq)))]
        qs.append({"type": "shape", "question": f"what shape is the {o.color} object?", "answer": o.shape})
    # count
    qs.append({"type": "count", "question": "how many objects are there?", "answer": NUMBER_WORDS[len(objs)]})
    # position
    uniq = _unique(objs, lambda o: (o.color, o.shape))
    if uniq:
        o = uniq[int(rng.integers(len(uniq)))]
        qs.append({"type": "position", "question": f"where is the {o.color} {o.shape}?", "answer": o.position})
    # existence, yes/no balanced by the caller; "no" prefers a recombination of attributes present
    present = {(o.color, o.shape) for o in objs}
    if want_yes:
        o = objs[int(rng.integers(len(objs)))]
        qs.append({"type": "exists", "question": f"is there a {o.color} {o.shape}?", "answer": "yes"})
    else:
        swaps = sorted({(a.color, b.shape) for a in objs for b in objs} - present)
        if swaps and rng.random() < 0.5:
            color, shape = swaps[int(rng.integers(len(swaps)))]
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = absent[int(rng.integers(len(absent)))]
        qs.append({"type": "exists", "question": f"is there a {color} {shape}?", "answer": "no"})
    return qs


def generate(
    out: str | Path, n: int, seed: int = 0, image_size: int = 96, questions_per_image: int | None = None
) -> dict:
    """Write ``n`` scenes under ``out``: images/, captions.json and vqa.json (LLaVA format),
    questions.jsonl (one question per line with its type), scenes.json (objects, patch labels)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions, vqa, flat, scenes = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img, objs, lmap = render_scene(rng, image_size)
        name = f"images/{seed}_{i:06d}.png"
        img.save(out / name)
        qs = questions(objs, rng, want_yes=(i % 2 == 0))
        order = rng.permutation(len(qs))
        qs = [qs[j] for j in order][: questions_per_image or len(qs)]
        sid = f"{seed}-{i}"
        captions.append(
            {
                "id": sid,
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\ndescribe the image."},
                    {"from": "gpt", "value": caption(objs)},
                ],
            }
        )
        conv = []
        for k, q in enumerate(qs):
            conv.append({"from": "human", "value": (f"{IMAGE_PLACEHOLDER}\n" if k == 0 else "") + q["question"]})
            conv.append({"from": "gpt", "value": q["answer"]})
        vqa.append({"id": sid, "image": name, "conversations": conv, "question_types": [q["type"] for q in qs]})
        for k, q in enumerate(qs):
            flat.append(
                {"id": f"{sid}-{k}", "image": name, "question": q["question"], "answer": q["answer"], "type": q["type"]}
            )
        scenes.append(
            {
                "id": sid,
                "image": name,
                "objects": [o.to_dict() for o in objs],
                "patch_objects": {str(g): patch_objects(lmap, len(objs), g) for g in PATCH_GRIDS},
            }
        )
    (out / "captions.json").write_text(json.dumps(captions))
    (out / "vqa.json").write_text(json.dumps(vqa))
    (out / "scenes.json").write_text(json.dumps(scenes))
    with open(out / "questions.jsonl", "w") as f:
        for q in flat:
            f.write(json.dumps(q) + "\n")
    info = {
        "n_images": n,
        "seed": seed,
        "image_size": image_size,
        "n_questions": len(flat),
        "by_type": {t: sum(q["type"] == t for q in flat) for t in QUESTION_TYPES},
    }
    (out / "world.json").write_text(json.dumps(info, indent=2))
    return info
