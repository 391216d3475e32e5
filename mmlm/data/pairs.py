"""``pairs``: contrastive training data, one JSON object per line of a JSONL file::

    {"query": {"text"?, "image"?}, "positive": {...}, "negatives"?: [{...}], "instruction"?: str, "id"?}

An item has a text, an image path (relative to ``image_root``, by default the file's folder) or
both, and may carry its own ``instruction``. The row's ``instruction`` conditions the query only (as
VLM2Vec and GME write it, and as retrieval evaluation embeds queries); candidates are written without
one unless the item has its own. Each item is written with the model's embedding prompt templates
(``model.embedding``: side ``query`` for the query, ``candidate`` for the positive and negatives), so
training embeds exactly what ``MultimodalLM.embed`` embeds.

A line that is not JSON, not an object, or has an empty side (no text and no image) is a bad sample
named by its line (``pairs.jsonl:7``), as is a missing image (found by the stage's up-front checks);
``on_bad_sample`` stops at it (error) or counts it once (skip). Blank lines are not rows.

A stage on pairs data yields micro-batches of two processor batches: ``query`` (one row per pair)
and ``candidate`` (the batch's positives in the queries' order, then every hard negative of the
batch), which the ``contrastive`` objective embeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmlm.data.records import Record, item_fields, resolve_image
from mmlm.data.sources import SourceOptions
from mmlm.embed.extract import prompts_for, render
from mmlm.errors import SampleError
from mmlm.images import load_image
from mmlm.modalities import IMAGE_PLACEHOLDER
from mmlm.processor import Encoded, Processor
from mmlm.registry import DATA_FORMATS

ITEM_KEYS = ("text", "image", "instruction")


@dataclass
class Pair:
    """A query, its positive and its hard negatives: items ``{"text"?, "image"?, "instruction"?}``
    with image paths as the row wrote them (relative to the record's image root)."""

    query: dict[str, Any]
    positive: dict[str, Any]
    negatives: list[dict[str, Any]] = field(default_factory=list)
    instruction: str | None = None  # the query's

    def sides(self) -> list[tuple[str, dict[str, Any], str | None]]:
        """(prompt side, item, instruction) of the query, the positive and each negative, in that order."""
        cands = [self.positive, *self.negatives]
        return [("query", self.query, self.instruction), *(("candidate", it, None) for it in cands)]

    def texts(self) -> list[str]:
        out = [it[k] for _, it, _ in self.sides() for k in ("text", "instruction") if it.get(k)]
        return out + ([self.instruction] if self.instruction else [])


@dataclass
class PairRecord(Record):
    """A pairs row: no messages; the three sides are in ``pair``. ``info["line"]`` is its line."""

    pair: Pair | None = None

    def texts(self) -> list[str]:
        return self.pair.texts() if self.pair is not None else []


@dataclass
class PairEncoded:
    """One pair as the processor encoded it (embedding prompts: see ``Processor.encode_prompt``)."""

    query: Encoded
    positive: Encoded
    negatives: list[Encoded]


class PairsOptions(SourceOptions):
    path_keys: ClassVar[dict[str, str]] = {"path": "file", "image_root": "dir"}
    data_kind: ClassVar[str] = "pairs"
    path: str  # .jsonl: one {query, positive, negatives?, instruction?} object per line
    image_root: str | None = None  # folder the items' image paths are relative to; default: the file's folder


def _item(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SampleError(
            f"{what!r} must be an object with text and/or image, not {type(value).__name__}", "bad format"
        )
    unknown = sorted(set(value) - set(ITEM_KEYS))
    if unknown:
        raise SampleError(f"{what!r} has unknown key(s) {unknown}; an item has {', '.join(ITEM_KEYS)}", "bad format")
    item = item_fields(value, lambda key: f"{what}.{key}")
    if not (item.get("text", "").strip() or "image" in item):
        raise SampleError(f"{what!r} has no text and no image", "empty side")
    return item


def parse_pair(row: Any) -> Pair:
    """A parsed JSON row -> a Pair; a SampleError (bad format, empty side) when it cannot be one."""
    if not isinstance(row, dict):
        raise SampleError(f"a row must be a JSON object, not {type(row).__name__}", "bad format")
    for side in ("query", "positive"):
        if row.get(side) is None:
            raise SampleError(f"no {side!r}: a row has query, positive and optionally negatives", "empty side")
    negatives = row.get("negatives") or []
    if not isinstance(negatives, list):
        raise SampleError(f"'negatives' must be a list of items, not {type(negatives).__name__}", "bad format")
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise SampleError(f"'instruction' must be a string, not {type(instruction).__name__}", "bad format")
    return Pair(
        _item(row["query"], "query"),
        _item(row["positive"], "positive"),
        [_item(n, f"negatives[{k}]") for k, n in enumerate(negatives)],
        instruction or None,
    )


@DATA_FORMATS.register(
    "pairs", options=PairsOptions, summary="JSONL query / positive / hard negatives for the contrastive objective"
)
def read_pairs(o: PairsOptions) -> list[Record]:
    path = Path(o.path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    root = Path(o.image_root) if o.image_root else path.parent
    out: list[Record] = []
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if o.max_samples is not None and len(out) >= o.max_samples:
                break
            info: dict[str, Any] = {"line": line}
            rid = str(line)
            try:
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise SampleError(f"not valid JSON: {err}", "bad json") from None
                if isinstance(row, dict) and isinstance(row.get("id"), (str, int)):
                    rid = str(row["id"])
                pair = parse_pair(row)
            except SampleError as err:
                out.append(PairRecord(rid, [], [], root, {}, {**info, "error": err}, str(path), row=len(out)))
                continue
            out.append(PairRecord(rid, [], [], root, {}, info, str(path), row=len(out), pair=pair))
    return out


# ------------------------------------------------------------------------------ stage datasets


def check_pair(rec: PairRecord, processor: Processor, embedding) -> list[tuple[str, Path | None]]:
    """What ``load_pair`` encodes, checked without decoding an image: each side's prompt (written
    with ``embedding``'s templates) and its resolved image path. Raises SampleError for a missing
    image, an image the model cannot take, or a prompt over ``processor.max_length``."""
    out = []
    for side, item, instruction in rec.pair.sides():
        path = None
        if "image" in item:
            if "image" not in processor.media:
                raise SampleError(f"a {side} has an image but this model has no image encoder", "bad media")
            path = resolve_image(rec.image_root, item["image"])
            if not path.is_file():
                raise SampleError(f"image not found: {path}", "missing image")
        prompt = render(item, prompts_for(embedding, side), instruction, side)
        n_ph = prompt.count(IMAGE_PLACEHOLDER)
        if n_ph != (path is not None):
            raise SampleError(
                f"the {side} prompt has {n_ph} {IMAGE_PLACEHOLDER} but {int(path is not None)} image",
                "media count mismatch",
            )
        n = processor.count_prompt_tokens(prompt, embedding.chat_template)
        if n > processor.config.max_length:
            raise SampleError(
                f"the {side} prompt is {n} tokens (media tokens included), over "
                f"processor.max_length={processor.config.max_length}; rejected, not truncated",
                "too long",
            )
        out.append((prompt, path))
    return out


def load_pair(prepared: list[tuple[str, Path | None]], processor: Processor, chat_template: bool, index: int):
    """Encode the prompts ``check_pair`` returned (images decoded now: a corrupt one is a SampleError)."""
    limit = processor.config.max_image_pixels
    enc = [
        processor.encode_prompt(prompt, {"image": [load_image(p, limit)]} if p else None, chat_template, index=index)
        for prompt, p in prepared
    ]
    return PairEncoded(enc[0], enc[1], enc[2:])


def collate_pairs(processor: Processor, samples: list[PairEncoded]) -> dict[str, Any]:
    """``query``: one row per pair; ``candidate``: the positives in the queries' order, then each
    pair's hard negatives in turn (so candidate ``i`` is query ``i``'s positive)."""
    cands = [s.positive for s in samples] + [n for s in samples for n in s.negatives]
    return {"query": processor.collate([s.query for s in samples]), "candidate": processor.collate(cands)}


def batch_tokens(batch: dict[str, Any]) -> int:
    """Real (unpadded) positions of a micro-batch: a processor batch, or the sub-batches of a pairs one."""
    if "sequence_lengths" in batch:  # packed rows (Processor.collate_packed)
        return int(batch["sequence_lengths"].sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return sum(int(b["attention_mask"].sum()) for b in batch.values() if isinstance(b, dict) and "attention_mask" in b)


def split_rows(batch: dict[str, Any], size: int, processor: Processor) -> list[dict[str, Any]]:
    """A processor batch cut into consecutive chunks of ``size`` rows, each a processor batch of
    its own: the rows' text tensors and their media items (found by the placeholder runs each row
    holds). The padding width stays the batch's, so each row computes what it computes in the whole."""
    n = batch["input_ids"].shape[0]
    per_row = {}
    for spec in processor.media.values():
        if batch.get(spec.batch_key) is not None:
            runs = (batch["input_ids"] == spec.token_id).sum(1) // spec.num_tokens
            per_row[spec.batch_key] = torch.cat([runs.new_zeros(1), runs.cumsum(0)]).tolist()
    out = []
    for start in range(0, n, size):
        stop = min(n, start + size)
        part = {k: v[start:stop] for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        for key, offsets in per_row.items():
            if offsets[stop] > offsets[start]:
                part[key] = batch[key][offsets[start] : offsets[stop]]
        out.append(part)
    return out
