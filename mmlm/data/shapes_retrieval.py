"""Retrieval data from the shapes world: evaluation tasks in MMEB's layout and contrastive training pairs.

``generate_retrieval(out, n, seed, candidates)`` writes a shapes world under ``out/world`` (images,
captions, questions, ``scenes.json``) and one JSONL file per task under ``out``::

    {"qry_text": str, "qry_img_path": str, "tgt_text": [str, ...], "tgt_img_path": [str, ...], "subset": task}

the positive first, image paths relative to ``out``, ``""`` for an absent side. Each query has
``candidates`` distinct candidates (fewer only when the world has fewer distinct items; ``info["short"]``
then says which task and why). Tasks (``n`` queries each where the world allows):

- ``image_to_caption``: an image -> its caption among captions of other scenes; a negative is never the
  same text and never describes the query image (its objects are not all in the scene; positions,
  sizes, colours and shapes compared). Recombined captions fill in only when the world is too small.
- ``caption_to_image``: a caption -> its image among images of scenes with other captions (no two
  candidates share a caption, and no negative holds every object the caption names).
- ``vqa``: an image + a question -> the answer among the world's distinct answer texts (same-type
  answers first). The world has only ``len(ANSWERS)`` (23) distinct answers, so this task is short.
- ``same_colour`` / ``same_shape`` (instruction-conditioned, as in ABC): a one-object image + an
  instruction (``qry_text``) -> the one candidate with an object of the same colour (shape). Both tasks
  are built from the same query images with two one-object partners: A shares the colour but not the
  shape, B the shape but not the colour; A is the positive of ``same_colour`` and a negative of
  ``same_shape``, B the other way round, so only the instruction tells which is right. No other
  candidate has an object of the named colour (shape).

``generate_pairs(out, n, seed)`` writes a world of ``n`` scenes under ``out/world`` and ``out/pairs.jsonl``
for the ``contrastive`` objective (``mmlm.data.pairs``)::

    {"id": str, "query": {"text"?, "image"?}, "positive": {...}, "negatives": [{...}, ...]}

covering the same five tasks, each row with 1-3 hard negatives: captions or images (rendered into
``out/variants``) differing from the positive in one attribute of one object, other answers of the
question's type, or for ``same_colour``/``same_shape`` the partner sharing the other attribute (up
to ``PARTNER_DRAWS`` partner pairs per one-object scene, so that these rows are about as many as the
others'). The instruction of the instruction-conditioned rows is the query's ``text`` (not the row's
``instruction``), exactly as ``qry_text`` carries it in the evaluation rows, so training embeds
queries as evaluation does. Rows are shuffled by seed. In-batch negatives can be false negatives here
(two VQA rows with the same answer, two same-colour rows whose positives share a colour).

Seeds: a world's image ``i`` depends on ``(seed, i)`` only, so evaluation tasks and training pairs
must be generated from different seeds (``mmlm demo --embed`` uses 5001 and 4001, away from the chat
demo's 1 and 1001); this module cannot tell, the caller chooses. Both are deterministic by seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmlm.data.shapes import (
    COLORS,
    NUMBER_WORDS,
    POSITIONS,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    Obj,
    _draw,
    caption,
    generate,
)

TASKS = ("image_to_caption", "caption_to_image", "vqa", "same_colour", "same_shape")
# "color", as the world's questions spell it, so a tokenizer fitted on the world knows the word
INSTRUCTIONS = {
    "same_colour": "Find an image with an object of the same color.",
    "same_shape": "Find an image with an object of the same shape.",
}
ANSWER_TYPES = {
    "color": list(COLORS),
    "shape": list(SHAPES),
    "count": list(NUMBER_WORDS.values()),
    "position": list(POSITIONS),
    "exists": ["yes", "no"],
}
ANSWERS = [a for t in QUESTION_TYPES for a in ANSWER_TYPES[t]]
ATTRS = ("color", "shape", "size", "position")
PARTNER_DRAWS = 3  # training rows per one-object query in same_colour / same_shape

Key = tuple[str, str, str, str]  # (position, size, color, shape): an object as a caption names it


# ------------------------------------------------------------------------------------- scenes
def obj_key(o: dict) -> Key:
    return (o["position"], o["size"], o["color"], o["shape"])


def scene_keys(scene: dict) -> frozenset[Key]:
    return frozenset(obj_key(o) for o in scene["objects"])


def caption_of(keys) -> str:
    """The world's caption (``shapes.caption``) of objects given as keys."""
    objs = [Obj(shape, color, size, POSITIONS.index(pos), (0, 0, 0, 0)) for pos, size, color, shape in keys]
    return caption(sorted(objs, key=lambda o: o.cell))


def one_attribute_changes(scene: dict) -> list[tuple[int, str, str]]:
    """Every (object index, attribute, new value) that changes one attribute of one object; the
    result never describes the scene (each cell holds one object, and a moved one goes to a free cell)."""
    objs = scene["objects"]
    taken = {o["position"] for o in objs}
    values = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
    out = []
    for k, o in enumerate(objs):
        for attr in ATTRS:
            for v in values[attr]:
                if v != o[attr] and not (attr == "position" and v in taken):
                    out.append((k, attr, v))
    return out


def changed(scene: dict, change: tuple[int, str, str]) -> list[dict]:
    k, attr, v = change
    objs = [dict(o) for o in scene["objects"]]
    objs[k][attr] = v
    return objs


def _read_world(world: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    scenes = json.loads((world / "scenes.json").read_text())
    questions: dict[str, list[dict]] = {}
    with open(world / "questions.jsonl") as f:
        for line in f:
            if line.strip():
                q = json.loads(line)
                questions.setdefault(q["image"], []).append(q)
    return scenes, questions


def _distinct_by_caption(scenes: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in scenes:
        c = caption_of(scene_keys(s))
        if c not in seen:
            seen.add(c)
            out.append(s)
    return out


def _has(scene: dict, attr: str, value: str) -> bool:
    return any(o[attr] == value for o in scene["objects"])


class _Partners:
    """For a one-object query, one-object scenes A (same colour, other shape) and B (same shape, other
    colour) at random; neither can be the query or share its caption."""

    def __init__(self, singles: list[dict]):
        self.a: dict[tuple[str, str], list[dict]] = {}
        self.b: dict[tuple[str, str], list[dict]] = {}
        one = [s["objects"][0] for s in singles]
        for c in COLORS:
            for sh in SHAPES:
                self.a[c, sh] = [s for s, o in zip(singles, one, strict=True) if o["color"] == c and o["shape"] != sh]
                self.b[c, sh] = [s for s, o in zip(singles, one, strict=True) if o["shape"] == sh and o["color"] != c]

    def __call__(self, q: dict, rng: np.random.Generator) -> tuple[dict, dict] | None:
        (o,) = q["objects"]
        a, b = self.a[o["color"], o["shape"]], self.b[o["color"], o["shape"]]
        if not a or not b:
            return None
        return a[int(rng.integers(len(a)))], b[int(rng.integers(len(b)))]


def _pick(rng: np.random.Generator, pool: list, k: int) -> list:
    if k <= 0:
        return []
    idx = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    return [pool[int(i)] for i in idx]


def _pick_excluding(rng: np.random.Generator, pool: list[dict], k: int, exclude: set[str]) -> list[dict]:
    """Up to ``k`` scenes of ``pool`` at random, none of whose ids is in ``exclude``."""
    if k <= 0:
        return []
    idx = rng.choice(len(pool), size=min(k + len(exclude), len(pool)), replace=False)
    return [pool[int(i)] for i in idx if pool[int(i)]["id"] not in exclude][:k]


def _question(qs: list[dict], i: int) -> dict:
    """Question types cycle over the rows (a type the scene lacks falls back to the next one)."""
    by_type = {q["type"]: q for q in qs}
    for j in range(len(QUESTION_TYPES)):
        t = QUESTION_TYPES[(i + j) % len(QUESTION_TYPES)]
        if t in by_type:
            return by_type[t]
    return qs[0]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# --------------------------------------------------------------------------- evaluation tasks
def _row(task: str, qtext: str, qimg: str, texts: list[str] | None, images: list[str] | None) -> dict:
    n = len(texts if texts is not None else images)
    return {
        "qry_text": qtext,
        "qry_img_path": qimg,
        "tgt_text": texts if texts is not None else [""] * n,
        "tgt_img_path": images if images is not None else [""] * n,
        "subset": task,
    }


def generate_retrieval(out: str | Path, n: int, seed: int, candidates: int = 100, image_size: int = 32) -> dict:
    """Write the five evaluation tasks (``n`` queries each where the world allows, ``candidates``
    distinct candidates per query) and a world of ``4 * max(n, candidates)`` scenes from ``seed``
    under ``out``; returns (and writes to ``out/info.json``) the rows and candidates per task."""
    if n < 1 or candidates < 2:
        raise ValueError(f"need n >= 1 and candidates >= 2, not n={n}, candidates={candidates}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_world = 4 * max(n, candidates)
    generate(out / "world", n_world, seed=seed, image_size=image_size)
    scenes, questions = _read_world(out / "world")
    img = {s["id"]: f"world/{s['image']}" for s in scenes}
    keys = {s["id"]: scene_keys(s) for s in scenes}
    cap = {s["id"]: caption_of(keys[s["id"]]) for s in scenes}
    distinct = _distinct_by_caption(scenes)  # image candidates: no two share a caption
    queries = scenes[:n]
    rows: dict[str, list[dict]] = {t: [] for t in TASKS}
    short: dict[str, str] = {}

    def rng(task: str, i: int) -> np.random.Generator:
        return np.random.default_rng([seed, TASKS.index(task), i])

    # image -> caption: other scenes' captions that do not describe the query (not a subset of it)
    all_caps = sorted({cap[s["id"]]: keys[s["id"]] for s in distinct}.items())
    for i, q in enumerate(queries):
        r, qk = rng("image_to_caption", i), keys[q["id"]]
        pool = [c for c, k in all_caps if c != cap[q["id"]] and not k <= qk]
        negs = _pick(r, pool, candidates - 1)
        if len(negs) < candidates - 1:  # a small world: recombine the query's attributes
            have = set(negs)
            extra = [caption_of(o) for o in (frozenset(map(obj_key, changed(q, c))) for c in one_attribute_changes(q))]
            extra = sorted({c for c in extra if c not in have})
            negs += _pick(r, extra, candidates - 1 - len(negs))
        rows["image_to_caption"].append(_row("image_to_caption", "", img[q["id"]], [cap[q["id"]], *negs], None))

    # caption -> image: images of scenes whose captions differ and hold not every object named
    for i, q in enumerate(queries):
        r, qk = rng("caption_to_image", i), keys[q["id"]]
        pool = [s for s in distinct if cap[s["id"]] != cap[q["id"]] and not qk <= keys[s["id"]]]
        negs = [img[s["id"]] for s in _pick(r, pool, candidates - 1)]
        rows["caption_to_image"].append(_row("caption_to_image", cap[q["id"]], "", None, [img[q["id"]], *negs]))

    # image + question -> answer: the question type's other answers first, then the rest
    for i, q in enumerate(queries):
        r, qa = rng("vqa", i), _question(questions[q["image"]], i)
        same = [a for a in ANSWER_TYPES[qa["type"]] if a != qa["answer"]]
        other = [a for a in ANSWERS if a not in ANSWER_TYPES[qa["type"]]]
        negs = (_pick(r, same, len(same)) + _pick(r, other, len(other)))[: candidates - 1]
        rows["vqa"].append(_row("vqa", qa["question"], img[q["id"]], [qa["answer"], *negs], None))

    # instruction-conditioned: one-object queries, partners A (same colour) and B (same shape)
    partners = _Partners([s for s in distinct if len(s["objects"]) == 1])
    for i, q in enumerate(s for s in scenes if len(s["objects"]) == 1):
        if len(rows["same_colour"]) == n:
            break
        r = rng("same_colour", i)
        found = partners(q, r)
        if found is None:
            continue
        a, b = found
        (o,) = q["objects"]
        for task, attr, pos, neg in (("same_colour", "color", a, b), ("same_shape", "shape", b, a)):
            used = {cap[x["id"]] for x in (q, a, b)}
            pool = [s for s in distinct if cap[s["id"]] not in used and not _has(s, attr, o[attr])]
            negs = [img[neg["id"]]] + [img[s["id"]] for s in _pick(r, pool, candidates - 2)]
            rows[task].append(_row(task, INSTRUCTIONS[task], img[q["id"]], None, [img[pos["id"]], *negs]))

    for task, rs in rows.items():
        _write_jsonl(out / f"{task}.jsonl", rs)
    got = {t: min((len(r["tgt_img_path"]) for r in rs), default=0) for t, rs in rows.items()}
    for t in TASKS:
        if got[t] < candidates:
            why = (
                f"the shapes world has {len(ANSWERS)} distinct answers"
                if t == "vqa"
                else f"the {n_world}-scene world has too few distinct candidates"
            )
            short[t] = f"{got[t]} candidates per query, not {candidates}: {why}"
        if len(rows[t]) < n:
            short[t] = "; ".join(
                filter(None, [short.get(t), f"{len(rows[t])} queries, not {n}: too few one-object scenes"])
            )
    info = {
        "seed": seed,
        "n": n,
        "image_size": image_size,
        "world_images": n_world,
        "rows": {t: len(rows[t]) for t in TASKS},
        "candidates": got,
        "requested_candidates": candidates,
        "short": short,
        "instructions": INSTRUCTIONS,
    }
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


# ---------------------------------------------------------------------------- training pairs
def _render_variant(scene: dict, change: tuple[int, str, str], image_size: int) -> Image.Image:
    """The scene redrawn with one attribute of one object changed (same boxes otherwise)."""
    cell_px = image_size / 3
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for j, o in enumerate(changed(scene, change)):
        x0, y0, x1, y1 = scene["objects"][j]["box"]
        cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
        if j == change[0] and change[1] == "position":
            (r0, c0), (r1, c1) = divmod(scene["objects"][j]["cell"], 3), divmod(POSITIONS.index(o["position"]), 3)
            cx, cy = cx + (c1 - c0) * cell_px, cy + (r1 - r0) * cell_px
        side = SIZES[o["size"]] * cell_px
        if j == change[0] and change[1] == "size":  # keep the object inside its cell as the world does
            r, c = divmod(o["cell"], 3)
            lim = (cell_px - side) / 2 * 0.8
            cx = float(np.clip(cx, (c + 0.5) * cell_px - lim, (c + 0.5) * cell_px + lim))
            cy = float(np.clip(cy, (r + 0.5) * cell_px - lim, (r + 0.5) * cell_px + lim))
        box = (
            int(round(cx - side / 2)),
            int(round(cy - side / 2)),
            int(round(cx + side / 2)) - 1,
            int(round(cy + side / 2)) - 1,
        )
        _draw(d, o["shape"], box, COLORS[o["color"]])
    return img


def _visible_changes(scene: dict, rng: np.random.Generator, k: int, out: Path, image_size: int):
    """Two draws (image -> caption, caption -> image) of up to ``k`` one-attribute changes, each with
    its rendering, whose pictures differ from the scene's and from each other."""
    changes = one_attribute_changes(scene)
    original = np.asarray(Image.open(out / "world" / scene["image"]).convert("RGB")).tobytes()
    draws = []
    for _ in range(2):
        seen, picked = {original}, []
        for j in rng.permutation(len(changes)):
            im = _render_variant(scene, changes[int(j)], image_size)
            b = np.asarray(im).tobytes()
            if b not in seen:
                seen.add(b)
                picked.append((changes[int(j)], im))
                if len(picked) == k:
                    break
        draws.append(picked)
    return draws


def generate_pairs(out: str | Path, n: int, seed: int, image_size: int = 32) -> dict:
    """Write a world of ``n`` scenes from ``seed`` and ``out/pairs.jsonl`` (rows of the five tasks,
    each with 1-3 hard negatives, shuffled by seed); returns (and writes to ``out/info.json``) the
    rows per task. Use a seed the evaluation tasks do not use."""
    if n < 1:
        raise ValueError(f"need n >= 1, not {n}")
    out = Path(out)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    generate(out / "world", n, seed=seed, image_size=image_size)
    scenes, questions = _read_world(out / "world")
    partners = _Partners([s for s in scenes if len(s["objects"]) == 1])
    lacking = {
        (attr, v): [s for s in scenes if not _has(s, attr, v)]
        for attr, values in (("color", COLORS), ("shape", SHAPES))
        for v in values
    }
    rows: dict[str, list[dict]] = {t: [] for t in TASKS}
    for i, q in enumerate(scenes):
        r = np.random.default_rng([seed, 99, i])
        image, cap = f"world/{q['image']}", caption_of(scene_keys(q))
        k = int(r.integers(1, 4))
        # image -> caption and caption -> image: the scene with one attribute of one object changed
        # (only changes that show: at a few pixels a small circle and square can draw the same)
        variants = _visible_changes(q, r, k, out, image_size)
        for task, picked in zip(("image_to_caption", "caption_to_image"), variants, strict=True):
            if task == "image_to_caption":
                negs = [{"text": caption_of(frozenset(map(obj_key, changed(q, c))))} for c, _ in picked]
                query, positive = {"image": image}, {"text": cap}
            else:
                negs = []
                for j, (_, im) in enumerate(picked):
                    name = f"variants/{q['id']}_{j}.png"
                    im.save(out / name)
                    negs.append({"image": name})
                query, positive = {"text": cap}, {"image": image}
            rows[task].append({"id": f"{task}-{q['id']}", "query": query, "positive": positive, "negatives": negs})
        # image + question -> answer: other answers of the question's type
        qa = _question(questions[q["image"]], i)
        others = [a for a in ANSWER_TYPES[qa["type"]] if a != qa["answer"]]
        rows["vqa"].append(
            {
                "id": f"vqa-{q['id']}",
                "query": {"image": image, "text": qa["question"]},
                "positive": {"text": qa["answer"]},
                "negatives": [{"text": a} for a in _pick(r, others, k)],
            }
        )
        # instruction-conditioned: the partner sharing the other attribute, then images lacking this one
        if len(q["objects"]) != 1:
            continue
        draws = {}  # up to PARTNER_DRAWS (A, B) pairs per query, so these tasks are as common as the others
        for _ in range(PARTNER_DRAWS):
            found = partners(q, r)
            if found is not None:
                draws.setdefault((found[0]["id"], found[1]["id"]), found)
        (o,) = q["objects"]
        for d, (a, b) in enumerate(draws.values()):
            for task, attr, pos, neg in (("same_colour", "color", a, b), ("same_shape", "shape", b, a)):
                pool = lacking[attr, o[attr]]
                negs = [neg, *_pick_excluding(r, pool, int(r.integers(0, 3)), {q["id"], neg["id"]})]
                rows[task].append(
                    {
                        "id": f"{task}-{q['id']}-{d}",
                        "query": {"image": image, "text": INSTRUCTIONS[task]},
                        "positive": {"image": f"world/{pos['image']}"},
                        "negatives": [{"image": f"world/{s['image']}"} for s in negs],
                    }
                )
    flat = [row for t in TASKS for row in rows[t]]
    order = np.random.default_rng([seed, 100]).permutation(len(flat))
    _write_jsonl(out / "pairs.jsonl", [flat[int(j)] for j in order])
    info = {
        "seed": seed,
        "n": n,
        "image_size": image_size,
        "rows": {t: len(rows[t]) for t in TASKS},
        "total": len(flat),
        "instructions": INSTRUCTIONS,
    }
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info
