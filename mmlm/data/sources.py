"""Readers for the data formats a stage can name: ``llava`` (JSON / JSONL), ``hf`` (datasets), and
the synthetic worlds ``shapes``, ``tones`` and ``clips`` (generated on first use)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmlm.data.records import Record, image_ref, read_conversation
from mmlm.errors import DataError, SampleError
from mmlm.modalities import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from mmlm.registry import DATA_FORMATS


class SourceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # what its records hold: conversations (lm, sea), or pairs (query / positive / negatives: contrastive)
    data_kind: ClassVar[str] = "conversations"
    max_samples: int | None = Field(None, gt=0)  # read only the source's first N samples; null: all of them


class LlavaOptions(SourceOptions):
    # options that name files or folders: relative ones are read from the config file's folder
    path_keys: ClassVar[dict[str, str]] = {"path": "file", "image_root": "dir"}
    path: str  # .json (a list) or .jsonl (one object per line)
    image_root: str | None = None  # folder the samples' image paths are relative to; default: the file's folder


def _read_json_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        with open(path) as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{ln}: not valid JSON: {err}") from None
        return rows
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text: {err}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples, found a {type(data).__name__}")
    return data


def row_to_record(row: dict, index: int, source: str, image_root: Path | None, images: list | None = None) -> Record:
    """A LLaVA-shaped row as a record; ``images``: the row's images when they come from elsewhere (a
    shard's image members) instead of its ``image`` key."""
    where = f"{source}[{index}]"
    if not isinstance(row, dict):
        raise SampleError(f"a row must be a JSON object, not {type(row).__name__}", "bad format", index, where=where)
    if images is None:
        images = _row_images(row, index, where)
    if "conversations" in row or "messages" in row:
        turns = row.get("conversations", row.get("messages"))
        if not isinstance(turns, list) or not turns:
            raise SampleError("'conversations' must be a non-empty list of turns", "bad format", index, where=where)
        # OpenAI-style content parts are read too; images come back in the order of their placeholders
        msgs, images = read_conversation(turns, images, where)
        info = {k: row[k] for k in ("question_types",) if k in row}
    elif "question" in row:
        q = row["question"]
        if images and IMAGE_PLACEHOLDER not in q:
            q = f"{IMAGE_PLACEHOLDER}\n" + q
        msgs = [{"role": "user", "content": q}]
        if "answer" in row:
            msgs.append({"role": "assistant", "content": str(row["answer"])})
        info = {"question_types": [row.get("type", "all")]}
    else:
        raise SampleError("needs 'conversations' (LLaVA) or 'question'/'answer' keys", "bad format", index, where=where)
    audio = _media_paths(row, "audio", AUDIO_PLACEHOLDER, "a sound file path", msgs, index, where)
    video = _media_paths(row, "video", VIDEO_PLACEHOLDER, "a folder of frames or a video file", msgs, index, where)
    return Record(
        str(row.get("id", index)), msgs, images, image_root, {}, info, source, row=index, audios=audio, videos=video
    )


def _row_images(row: dict, index: int, where: str) -> list[str]:
    key = "image" if "image" in row else "images"
    listed = row.get(key)
    listed = [] if listed is None else [listed] if isinstance(listed, (str, dict)) else listed
    if not isinstance(listed, list):
        raise SampleError(
            f"{key!r} is {type(listed).__name__}; expected an image path or a list of them",
            "unsupported format",
            index,
            where=where,
        )
    # a path string, a file:// path or {"path": ...}; URLs, inline data and other shapes are refused
    return [image_ref(v, f"{key}[{j}]", where) for j, v in enumerate(listed)]


def _media_paths(row: dict, key: str, placeholder: str, what: str, msgs: list[dict], index: int, where: str):
    """The paths a row gives under ``key`` (or ``key + "s"``): one string or a list of them. When no
    message holds ``placeholder``, one per item is put before the first user turn (as for images)."""
    given = row.get(key, row.get(f"{key}s"))
    given = [] if given is None else [given] if isinstance(given, str) else given
    if not isinstance(given, list) or not all(isinstance(a, str) and a for a in given):
        raise SampleError(f"{key!r} must be {what} or a list of them", "unsupported format", index, where=where)
    if given and not any(placeholder in m["content"] for m in msgs):
        first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[first] = {**msgs[first], "content": placeholder * len(given) + "\n" + msgs[first]["content"]}
    return given


@DATA_FORMATS.register("llava", options=LlavaOptions, summary="LLaVA-format JSON or JSONL, images under image_root")
def read_llava(o: LlavaOptions) -> list[Record]:
    path = Path(o.path)
    root = Path(o.image_root) if o.image_root else path.parent
    rows = _read_json_rows(path)[: o.max_samples]
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(row_to_record(row, i, str(path), root))
        except SampleError as err:
            out.append(Record(str(i), [], [], root, {}, {"error": err}, str(path), row=i))
    return out


class WebDatasetOptions(SourceOptions):
    path_keys: ClassVar[dict[str, str]] = {"path": "file_or_dir"}
    path: str  # a .tar shard, or a folder whose .tar shards are read in name order
    # the user turn of a caption-only sample (.txt, or a .json with a caption): LLaVA pre-training's shape
    caption_prompt: str = "Describe the image briefly."


@DATA_FORMATS.register(
    "webdataset",
    options=WebDatasetOptions,
    summary="WebDataset tar shards: image(s) + .json conversation or .txt caption per sample",
)
def read_webdataset(o: WebDatasetOptions) -> list[Record]:
    from mmlm.data.shards import image_members, sample_row, scan_shard, shard_files

    out = []
    for shard in shard_files(Path(o.path)):
        for j, (key, parts) in enumerate(scan_shard(shard)):
            if o.max_samples is not None and len(out) >= o.max_samples:
                return out
            images = image_members(parts)
            try:
                try:
                    row = sample_row(parts, f"{IMAGE_PLACEHOLDER}\n{o.caption_prompt}" if images else o.caption_prompt)
                except ValueError as err:
                    raise SampleError(str(err), "bad format", j, where=f"{shard}[{j}]") from None
                if isinstance(row, dict):
                    row = {**row, "id": row.get("id", key)}
                out.append(row_to_record(row, j, str(shard), None, images=images))
            except SampleError as err:
                out.append(Record(key, [], [], None, {}, {"error": err}, str(shard), row=j))
    return out


class HFOptions(SourceOptions):
    path_keys: ClassVar[dict[str, str]] = {"path": "local_or_hub"}
    path: str  # a directory saved with Dataset.save_to_disk, or a dataset name/path for load_dataset
    split: str = "train"  # the split to read (of load_dataset, or of a DatasetDict saved to disk)
    image_column: str = "image"  # column with the sample's image or list of images
    conversations_column: str = "conversations"  # column with the turns: {from, value} (LLaVA) or {role, content}


@DATA_FORMATS.register(
    "hf", options=HFOptions, summary="a Hugging Face dataset (save_to_disk folder or load_dataset path)"
)
def read_hf(o: HFOptions) -> list[Record]:
    import datasets

    p = Path(o.path)
    if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[o.split]
    else:
        ds = datasets.load_dataset(o.path, split=o.split)
    if o.max_samples:
        ds = ds.select(range(min(o.max_samples, len(ds))))
    out = []
    for i, row in enumerate(ds):
        imgs = row.get(o.image_column)
        imgs = [] if imgs is None else (list(imgs) if isinstance(imgs, list) else [imgs])
        conv = row.get(o.conversations_column)
        try:
            if conv is None:
                raise SampleError(f"{o.path}[{i}]: no column {o.conversations_column!r}", "bad format", i)
            msgs, imgs = read_conversation(conv, imgs, f"{o.path}[{i}]")
            out.append(Record(str(row.get("id", i)), msgs, imgs, None, {}, {}, o.path, row=i))
        except SampleError as err:
            out.append(Record(str(i), [], [], None, {}, {"error": err}, o.path, row=i))
    return out


class ShapesOptions(SourceOptions):
    path_keys: ClassVar[dict[str, str]] = {"path": "new_dir"}
    path: str  # folder; generated there on first use
    n: int = Field(gt=0)  # number of images (scenes) in the world
    seed: int = 0  # image i depends on (seed, i) only: give held-out splits disjoint seeds
    image_size: int = Field(96, gt=0)  # side of the square images in pixels
    # captions: one describe-the-image sample per image; vqa: an image's questions as one multi-turn
    # conversation; questions: one single-turn sample per question, with its type (per-type scores)
    task: Literal["captions", "vqa", "questions"] = "vqa"
    # keep at most this many of each image's questions (a random subset, fixed when the world is
    # generated); null: all of them
    questions_per_image: int | None = Field(None, gt=0)


@DATA_FORMATS.register("shapes", options=ShapesOptions, summary="the synthetic shapes world (generated on first use)")
def read_shapes(o: ShapesOptions) -> list[Record]:
    from mmlm.data import shapes

    root = Path(o.path)
    want = {"n_images": o.n, "seed": o.seed, "image_size": o.image_size}
    info_file = root / "world.json"
    if info_file.is_file():
        have = json.loads(info_file.read_text())
        if any(have.get(k) != v for k, v in want.items()):
            raise ValueError(
                f"{root} holds a shapes world with { ({k: have.get(k) for k in want}) }, not {want}; "
                "use another path or delete it"
            )
    else:
        shapes.generate(root, o.n, seed=o.seed, image_size=o.image_size, questions_per_image=o.questions_per_image)
    file = {"captions": "captions.json", "vqa": "vqa.json", "questions": "questions.jsonl"}[o.task]
    records = read_llava(LlavaOptions(path=str(root / file), image_root=str(root), max_samples=o.max_samples))
    scenes = {s["image"]: s for s in json.loads((root / "scenes.json").read_text())}
    labels = {}
    for img, s in scenes.items():  # per-patch word labels at every grid the world writes (for SEA)
        labels[img] = {g: shapes.label_words(s["objects"], idx) for g, idx in s["patch_objects"].items()}
    for r in records:
        r.meta = {"patch_labels": [labels[img] for img in r.images if img in labels]}
        if len(r.meta["patch_labels"]) != len(r.images):
            r.meta = {}
    return records


class TonesOptions(SourceOptions):
    path_keys: ClassVar[dict[str, str]] = {"path": "new_dir"}
    path: str  # folder; generated there on first use
    n: int = Field(gt=0)  # number of clips in the world
    seed: int = 0  # clip i depends on (seed, i) only: give held-out splits disjoint seeds
    # captions: one describe-the-sound sample per clip; qa: a clip's four questions as one
    # multi-turn conversation; questions: one single-turn sample per question, with its type
    task: Literal["captions", "qa", "questions"] = "qa"


@DATA_FORMATS.register(
    "tones", options=TonesOptions, summary="the synthetic tones world of beeps (generated on first use)"
)
def read_tones(o: TonesOptions) -> list[Record]:
    from mmlm.data import tones

    root = Path(o.path)
    want = {"n": o.n, "seed": o.seed}
    info_file = root / "world.json"
    if info_file.is_file():
        have = json.loads(info_file.read_text())
        if any(have.get(k) != v for k, v in want.items()):
            raise ValueError(f"{root} holds a tones world with {have}, not {want}; use another path or delete it")
    else:
        tones.generate(root, o.n, seed=o.seed)
    file = {"captions": "captions.json", "qa": "qa.json", "questions": "questions.jsonl"}[o.task]
    return read_llava(LlavaOptions(path=str(root / file), image_root=str(root), max_samples=o.max_samples))


class ClipsOptions(SourceOptions):
    path_keys: ClassVar[dict[str, str]] = {"path": "new_dir"}
    path: str  # folder; generated there on first use
    n: int = Field(gt=0)  # number of clips in the world
    seed: int = 0  # clip i depends on (seed, i) only: give held-out splits disjoint seeds
    image_size: int = Field(48, ge=16)  # side of the square frames in pixels
    frames: int = Field(8, ge=4)  # frames per clip (written as frame_00.png ...)
    # captions: one describe-the-video sample per clip; qa: a clip's three questions as one
    # multi-turn conversation; questions: one single-turn sample per question, with its type
    task: Literal["captions", "qa", "questions"] = "qa"


@DATA_FORMATS.register(
    "clips", options=ClipsOptions, summary="the synthetic video world of moving shapes (generated on first use)"
)
def read_clips(o: ClipsOptions) -> list[Record]:
    from mmlm.data import clips

    root = Path(o.path)
    want = {"n": o.n, "seed": o.seed, "image_size": o.image_size, "frames": o.frames}
    info_file = root / "world.json"
    if info_file.is_file():
        have = json.loads(info_file.read_text())
        if any(have.get(k) != v for k, v in want.items()):
            have = {k: have.get(k) for k in want}
            raise ValueError(f"{root} holds a clips world with {have}, not {want}; use another path or delete it")
    else:
        clips.generate(root, o.n, seed=o.seed, image_size=o.image_size, frames=o.frames)
    file = {"captions": "captions.json", "qa": "qa.json", "questions": "questions.jsonl"}[o.task]
    records = read_llava(LlavaOptions(path=str(root / file), image_root=str(root), max_samples=o.max_samples))
    params = {c["video"]: c for c in json.loads((root / "clips.json").read_text())}
    for r in records:  # a word per connector token (the sea objective with label_key: query_labels)
        if r.videos and all(v in params for v in r.videos):
            labels = [{str(g): clips.query_labels(params[v], g * g) for g in clips.QUERY_GRIDS} for v in r.videos]
            r.meta = {"query_labels": labels}
    return records


def read_source(src, where: str = "data") -> list[Record]:
    return DATA_FORMATS.create(src, where=where)
