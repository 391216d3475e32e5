"""``mmlm embed``: a JSONL file of items -> a file of vectors.

Each input line is ``{"id"?, "text"?, "image"?, "instruction"?}`` with at least a text or an image;
image paths are relative to the input file's folder (or ``image_root``). Other keys are ignored. The
output format is the output file's suffix:

- ``.npy``: float32 ``[N, D]``, the embedded rows in input order, and ``NAME.ids.json`` beside it (the
  rows' ids, or their line numbers where a row has no id);
- ``.parquet``: columns ``id`` and ``vector`` (needs pyarrow: ``pip install 'mmlm[embed]'``); ids are
  integers when every id is one, else strings;
- ``.safetensors``: the tensor ``embeddings`` and the ids as JSON under the metadata key ``ids``.

A bad row (not JSON, not an object, empty, a missing or unreadable image, too long) is skipped and
reported (``on_bad_sample="skip"``; listed in ``NAME.skipped.jsonl``) or stops the run naming its line
(``"error"``). Nothing here prints: the caller gets callbacks for progress and skipped rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmlm.data.records import item_fields
from mmlm.errors import DataError, SampleError
from mmlm.images import load_image

FORMATS = (".npy", ".parquet", ".safetensors")
ON_BAD_SAMPLE = ("skip", "error")


@dataclass
class Skipped:
    """A row left out: its line (1-based), id (None when it has none), reason and message."""

    line: int
    id: Any
    reason: str
    message: str

    def where(self, source: str) -> str:
        return f"{source}:{self.line}" + (f" (id {self.id})" if self.id is not None else "")


@dataclass
class Row:
    line: int
    id: str | int | None  # the row's own id
    item: dict[str, Any]  # text / image (a Path) / instruction, as MultimodalLM.embed takes them


def sidecar(output: Path, what: str) -> Path:
    """``emb.npy`` -> ``emb.ids.json`` / ``emb.skipped.jsonl``."""
    return output.with_name(output.stem + what)


def check_output(output: Path) -> str:
    """The output format, checked before any work: a known suffix, and pyarrow for parquet."""
    fmt = output.suffix.lower()
    if fmt not in FORMATS:
        raise DataError(f"--output {output}: the suffix names the format, one of {', '.join(FORMATS)}")
    if fmt == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportError(
                "writing .parquet needs pyarrow: pip install pyarrow (or pip install 'mmlm[embed]')"
            ) from None
    return fmt


def check_args(model, batch_size: int, dim: int | None) -> None:
    """``--batch-size`` and ``--dim`` checked before any work (a user's mistake: exit 2, not a fault)."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, not {batch_size}")
    width = model.embedding_width
    if dim is not None and not 0 < dim <= width:
        raise DataError(f"--dim {dim} is not between 1 and the embedding width {width}")


def parse_row(obj: Any, line: int, root: Path) -> Row:
    """One parsed JSON line -> a Row; a SampleError (reason: bad format, empty row) when it cannot be one."""
    if not isinstance(obj, dict):
        raise SampleError(f"a row must be a JSON object, not {type(obj).__name__}", "bad format")
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise SampleError(f"'id' must be a string or an integer, not {type(rid).__name__}", "bad format")
    item = item_fields(obj, lambda key: "image" if key == "image" else repr(key))
    if "image" in item:
        item["image"] = root / item["image"]  # an absolute path stays as it is
    if not (item.get("text", "").strip() or "image" in item):
        raise SampleError("a row needs a text or an image (or both)", "empty row")
    return Row(line, rid, item)


def read_rows(path: Path, image_root: Path | None = None) -> list[Row | Skipped]:
    """The rows of a JSONL file in order; blank lines are not rows. A line that cannot be a row is a
    Skipped in its place (reason ``bad json``, ``bad format`` or ``empty row``)."""
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    root = image_root if image_root is not None else path.parent
    out: list[Row | Skipped] = []
    with open(path, "rb") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                out.append(Skipped(line, None, "bad json", f"not valid JSON: {err}"))
                continue
            try:
                out.append(parse_row(obj, line, root))
            except SampleError as err:
                rid = obj.get("id") if isinstance(obj, dict) else None
                out.append(Skipped(line, rid if isinstance(rid, (str, int)) else None, err.reason, err.detail))
    return out


def embed_some(
    model,
    items: Sequence[dict[str, Any]],
    *,
    instruction: str | None = None,
    dim: int | None = None,
    side: str = "query",
) -> tuple[torch.Tensor, dict[int, SampleError]]:
    """Embed what can be embedded of ``items`` (one batch): images are read here with the
    checkpoint's ``processor.max_image_pixels``, and an item that fails (unreadable image, too long)
    is left out. Returns the vectors of the others, in order, and ``{index: error}`` for the failed."""
    limit = model.processor.config.max_image_pixels
    failed: dict[int, SampleError] = {}
    ready: list[tuple[int, dict[str, Any]]] = []
    for i, item in enumerate(items):
        image = item.get("image")
        if isinstance(image, (str, os.PathLike)):
            try:
                item = {**item, "image": load_image(image, limit)}
            except SampleError as err:
                failed[i] = err
                continue
        ready.append((i, item))
    while ready:
        try:
            vecs = model.embed(
                [it for _, it in ready], instruction=instruction, dim=dim, side=side, batch_size=len(ready)
            )
            return vecs, failed
        except SampleError as err:  # one item is bad (too long, ...): leave it out, embed the rest
            if err.index is None or not 0 <= err.index < len(ready):
                raise
            failed[ready.pop(err.index)[0]] = err
    width = dim or model.config.model.embedding.dim or model.embedding_width
    return torch.zeros(0, width), failed


def embed_file(
    model,
    input: Path,
    output: Path,
    *,
    image_root: Path | None = None,
    batch_size: int = 32,
    dim: int | None = None,
    instruction: str | None = None,
    side: str = "query",
    on_bad_sample: str = "skip",
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
) -> dict[str, Any]:
    """Embed every row of ``input`` into ``output`` (see the module docstring). ``on_start(total)``
    gets the number of rows, ``on_progress(n)`` the rows finished by each batch, ``on_skip`` each row
    left out. Returns ``{"embedded", "skipped", "output", "ids", "skipped_file"}``; nothing is written
    but the skipped file when no row could be embedded (``embedded == 0``)."""
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, not {on_bad_sample!r}")
    check_args(model, batch_size, dim)
    fmt = check_output(output)
    rows = read_rows(input, image_root)
    skipped: list[Skipped] = []

    def skip(s: Skipped) -> None:
        if on_bad_sample == "error":
            raise SampleError(s.message, s.reason, where=s.where(str(input)))
        skipped.append(s)
        if on_skip:
            on_skip(s)

    if on_start:
        on_start(len(rows))
    vectors: list[torch.Tensor] = []
    ids: list[Any] = []
    pending: list[Row | Skipped] = []  # rows up to the batch's last good one, reported in line order

    def flush() -> None:
        good = [r for r in pending if isinstance(r, Row)]
        vecs, failed = embed_some(model, [r.item for r in good], instruction=instruction, dim=dim, side=side)
        failed_rows = {id(good[i]): err for i, err in failed.items()}
        for r in pending:
            if isinstance(r, Skipped):
                skip(r)
            elif id(r) in failed_rows:
                skip(Skipped(r.line, r.id, failed_rows[id(r)].reason, failed_rows[id(r)].detail))
            else:
                ids.append(r.line if r.id is None else r.id)
        vectors.append(vecs)
        if on_progress:
            on_progress(len(pending))
        pending.clear()

    in_batch = 0
    for r in rows:
        pending.append(r)
        in_batch += isinstance(r, Row)
        if in_batch == batch_size or (on_bad_sample == "error" and isinstance(r, Skipped)):
            flush()  # with "error", the rows before a bad line go first: one of them may be the first bad row
            in_batch = 0
    if pending:
        flush()

    skipped_file = sidecar(output, ".skipped.jsonl")
    if skipped:
        _atomic_write(skipped_file, "".join(json.dumps(asdict(s)) + "\n" for s in skipped).encode())
    elif skipped_file.is_file():  # a stale list from an earlier run would describe other rows
        skipped_file.unlink()
    result = {
        "embedded": len(ids),
        "skipped": len(skipped),
        "output": None,
        "ids": None,
        "skipped_file": skipped_file if skipped else None,
    }
    if not ids:
        return result
    matrix = torch.cat(vectors).float().contiguous()
    result["output"] = output
    if fmt == ".npy":
        result["ids"] = sidecar(output, ".ids.json")
        write_npy(output, matrix, ids)
    elif fmt == ".parquet":
        write_parquet(output, matrix, ids)
    else:
        write_safetensors(output, matrix, ids)
    return result


def _atomic_write(path: Path, data: bytes | None = None, writer: Callable[[Path], None] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if writer is not None:
            writer(tmp)
        else:
            tmp.write_bytes(data or b"")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_npy(output: Path, matrix: torch.Tensor, ids: list[Any]) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, matrix.numpy())

    _atomic_write(output, writer=save)
    _atomic_write(sidecar(output, ".ids.json"), json.dumps(ids).encode())


def parquet_ids(ids: list[Any]) -> list[Any]:
    """One column type: integers when every id is one, else strings."""
    return ids if all(isinstance(i, int) for i in ids) else [str(i) for i in ids]


def write_parquet(output: Path, matrix: torch.Tensor, ids: list[Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = matrix.shape
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.numpy().reshape(-1), pa.float32()), d)
    table = pa.table({"id": pa.array(parquet_ids(ids)), "vector": vectors})
    _atomic_write(output, writer=lambda tmp: pq.write_table(table, tmp))


def write_safetensors(output: Path, matrix: torch.Tensor, ids: list[Any]) -> None:
    from safetensors.torch import save_file

    _atomic_write(
        output, writer=lambda tmp: save_file({"embeddings": matrix}, str(tmp), metadata={"ids": json.dumps(ids)})
    )
