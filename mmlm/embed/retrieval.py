"""Retrieval evaluation in MMEB's layout: each query ranks its own candidate list, the positive first.

Metrics (one relevant candidate per query, ``rank`` its 1-based position): Precision@1 (hit@1),
Recall@5 (hit@5), nDCG@10 (``1 / log2(rank + 1)`` when ``rank <= 10``, else 0) and MRR (``1 / rank``).
Ties count against the positive: its rank is 1 + the number of other candidates scoring at least as
high, so a constant score is never a hit (unless the list has one candidate).

MMEB rows: ``qry_text``, ``qry_img_path`` (the query), ``tgt_text`` and ``tgt_img_path`` (lists of
candidates, the positive first; one of them may be missing or empty when candidates are images or
texts only), and optionally ``subset`` or ``dataset`` to group by (default: the file's name).
Phi-3-V's image token ``<|image_1|>`` in texts is removed: the prompt templates place the image.
A row with an empty side, no candidates, or an image that cannot be read is counted and named
(MMEB's own loader drops such rows silently).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mmlm.data.records import image_ref
from mmlm.embed.files import check_args, embed_some
from mmlm.errors import DataError, SampleError
from mmlm.images import load_image

PHI3V_IMAGE_TOKEN = "<|image_1|>"
METRICS = ("precision@1", "recall@5", "ndcg@10", "mrr")

Key = tuple[str, str | None]  # (text, image path): what an item is, so that repeats embed once


# ---------------------------------------------------------------------------------------- metrics
def positive_ranks(scores: Sequence[Sequence[float]] | torch.Tensor) -> list[int]:
    """The 1-based rank of candidate 0 in each query's scores, ties counted against it."""
    ranks = []
    for row in scores:
        row = torch.as_tensor(row, dtype=torch.float64).reshape(-1)
        if row.numel() == 0:
            raise ValueError("a query needs at least one candidate")
        ranks.append(1 + int((row[1:] >= row[0]).sum()))
    return ranks


def metrics_from_ranks(ranks: Sequence[int]) -> dict[str, float | None]:
    """Mean hit@1, hit@5, nDCG@10 and reciprocal rank over queries (None for none), with ``n``."""
    n = len(ranks)
    if n == 0:
        return {"n": 0, **dict.fromkeys(METRICS)}
    return {
        "n": n,
        "precision@1": sum(r <= 1 for r in ranks) / n,
        "recall@5": sum(r <= 5 for r in ranks) / n,
        "ndcg@10": sum(1 / math.log2(r + 1) for r in ranks if r <= 10) / n,
        "mrr": sum(1 / r for r in ranks) / n,
    }


def retrieval_metrics(scores: Sequence[Sequence[float]] | torch.Tensor) -> dict[str, float | None]:
    """Metrics of a score matrix (or ragged lists): one row per query, the positive at index 0."""
    return metrics_from_ranks(positive_ranks(scores))


# ---------------------------------------------------------------------------------------- reading
@dataclass
class RetrievalRow:
    index: int  # position among the file's rows (0-based)
    where: str  # file:line (JSONL) or file[index]
    subset: str
    query: Key
    candidates: list[Key]


@dataclass
class SkippedRow:
    index: int
    where: str
    subset: str | None
    reason: str
    message: str


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SampleError(f"{what} must be a string, not {type(value).__name__}", "bad format")
    return value.replace(PHI3V_IMAGE_TOKEN, "").strip()


def _image(value: Any, what: str, root: Path) -> str | None:
    if value in (None, ""):
        return None
    return str(root / image_ref(value, what, ""))


def _listed(row: dict, key: str) -> list:
    value = row.get(key)
    if value is None:
        return []
    if isinstance(value, str):  # a single candidate written bare
        return [value]
    if not isinstance(value, list):
        raise SampleError(f"{key!r} must be a list of candidates, not {type(value).__name__}", "bad format")
    return value


def parse_mmeb_row(row: Any, root: Path) -> tuple[Key, list[Key]]:
    if not isinstance(row, dict):
        raise SampleError(f"a row must be a JSON object, not {type(row).__name__}", "bad format")
    query = (_text(row.get("qry_text"), "qry_text"), _image(row.get("qry_img_path"), "qry_img_path", root))
    if not query[0] and query[1] is None:
        raise SampleError("the query has neither qry_text nor qry_img_path", "empty query")
    texts, images = _listed(row, "tgt_text"), _listed(row, "tgt_img_path")
    n = max(len(texts), len(images))
    if n == 0:
        raise SampleError("no candidates: tgt_text and tgt_img_path are empty", "no candidates")
    if texts and images and len(texts) != len(images):
        raise SampleError(f"tgt_text has {len(texts)} candidates but tgt_img_path {len(images)}", "bad format")
    texts, images = texts or [""] * n, images or [None] * n
    cands = [
        (_text(t, f"tgt_text[{j}]"), _image(p, f"tgt_img_path[{j}]", root))
        for j, (t, p) in enumerate(zip(texts, images, strict=True))
    ]
    empty = [j for j, (t, p) in enumerate(cands) if not t and p is None]
    if empty:
        raise SampleError(f"candidate {empty[0]} has neither text nor image", "empty candidate")
    return query, cands


def _raw_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) for each row; a JSONL line that is not JSON is a row holding the error."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}[{i}]", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    if path.suffix == ".jsonl":
        out = []
        with open(path, "rb") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append((f"{path}:{ln}", json.loads(line)))
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        out.append((f"{path}:{ln}", SampleError(f"not valid JSON: {err}", "bad json")))
        return out
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of MMEB rows (or JSONL), found a {type(data).__name__}")
    return [(f"{path}[{i}]", r) for i, r in enumerate(data)]


def read_mmeb(path: Path, image_root: Path | None = None) -> tuple[list[RetrievalRow], list[SkippedRow]]:
    """The usable rows of an MMEB-layout file (.json list, .jsonl or .parquet) and the skipped ones."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows, skipped = [], []
    for i, (where, raw) in enumerate(_raw_rows(path)):
        subset = raw.get("subset", raw.get("dataset")) if isinstance(raw, dict) else None
        subset = path.stem if subset is None else str(subset)
        try:
            if isinstance(raw, SampleError):
                raise raw
            query, cands = parse_mmeb_row(raw, root)
        except SampleError as err:
            skipped.append(SkippedRow(i, where, subset, err.reason, err.detail))
            continue
        rows.append(RetrievalRow(i, where, subset, query, cands))
    return rows, skipped


# ---------------------------------------------------------------------------------------- evaluation
def embed_keys(
    model,
    keys: Sequence[Key],
    *,
    side: str,
    batch_size: int,
    dim: int | None,
    instruction: str | None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[dict[Key, torch.Tensor], dict[Key, SampleError]]:
    """Each distinct key embedded once; the keys that could not be (their image unreadable, ...)."""
    vectors: dict[Key, torch.Tensor] = {}
    failed: dict[Key, SampleError] = {}
    bad_images: dict[str, SampleError] = {}
    limit = model.processor.config.max_image_pixels
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        items = []
        for text, image in chunk:
            item: dict[str, Any] = {"text": text} if text else {}
            if image is not None:
                item["image"] = image
            items.append(item)
        # an unreadable image is tried once, however many keys name it
        for item in items:
            image = item.get("image")
            if image is not None and image not in bad_images:
                try:
                    item["image"] = load_image(image, limit)
                except SampleError as err:
                    bad_images[image] = err
        ok = [j for j, (_, image) in enumerate(chunk) if image is None or image not in bad_images]
        for j, (_, image) in enumerate(chunk):
            if image is not None and image in bad_images:
                failed[chunk[j]] = bad_images[image]
        vecs, errs = embed_some(model, [items[j] for j in ok], instruction=instruction, dim=dim, side=side)
        done = [j for k, j in enumerate(ok) if k not in errs]
        for k, err in errs.items():
            failed[chunk[ok[k]]] = err
        for j, v in zip(done, vecs, strict=True):
            vectors[chunk[j]] = v
        if on_progress:
            on_progress(len(chunk))
    return vectors, failed


def evaluate_retrieval(
    model,
    path: Path,
    *,
    image_root: Path | None = None,
    batch_size: int = 32,
    dim: int | None = None,
    instruction: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Embed an MMEB-layout file's queries (side ``query``, with ``instruction``) and candidates (side
    ``candidate``), each distinct (text, image) once; score candidates by cosine; return
    ``{"overall", "subsets", "macro"?, "skipped", ...}``. ``macro`` (the mean over subsets, MMEB's
    headline) is there when there are several subsets."""
    check_args(model, batch_size, dim)
    path = Path(path)
    rows, skipped = read_mmeb(path, image_root)
    queries = list(dict.fromkeys(r.query for r in rows))
    cands = list(dict.fromkeys(c for r in rows for c in r.candidates))
    if on_start:
        on_start(len(queries) + len(cands))
    common = {"batch_size": batch_size, "dim": dim, "on_progress": on_progress}
    qvec, qfail = embed_keys(model, queries, side="query", instruction=instruction, **common)
    cvec, cfail = embed_keys(model, cands, side="candidate", instruction=None, **common)
    ranks: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        bad = [("query", qfail[r.query])] if r.query in qfail else []
        bad += [(f"candidate {j}", cfail[c]) for j, c in enumerate(r.candidates) if c in cfail]
        if bad:
            what, err = bad[0]
            skipped.append(SkippedRow(r.index, r.where, r.subset, err.reason, f"{what}: {err.detail}"))
            continue
        scores = torch.stack([cvec[c] for c in r.candidates]) @ qvec[r.query]
        ranks[r.subset].append(positive_ranks([scores])[0])
    skipped.sort(key=lambda s: s.index)
    left_out = Counter(s.subset for s in skipped)
    names = sorted(set(ranks) | {s.subset for s in skipped if s.subset is not None})
    subsets = {name: {**metrics_from_ranks(ranks[name]), "skipped": left_out[name]} for name in names}
    result: dict[str, Any] = {
        "task": "retrieval",
        "data": str(path),
        "overall": metrics_from_ranks([x for rs in ranks.values() for x in rs]),
        "subsets": subsets,
    }
    scored = [s for s in subsets.values() if s["n"]]
    if len(scored) > 1:  # MMEB's headline: the mean over data sets (those with a row evaluated)
        result["macro"] = {"n": len(scored), **{m: sum(s[m] for s in scored) / len(scored) for m in METRICS}}
    result["distinct_queries"] = len(queries)
    result["distinct_candidates"] = len(cands)
    result["skipped"] = {
        "count": len(skipped),
        "by_reason": dict(Counter(s.reason for s in skipped)),
        "rows": [asdict(s) for s in skipped],
    }
    return result
