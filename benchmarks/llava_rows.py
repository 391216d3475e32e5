"""Start-up of a LLaVA-1.5-sized data set: how long reading a 665k-row LLaVA JSON takes and how much
memory its rows hold, before the first training step.

    python benchmarks/llava_rows.py                 # 665,298 rows, as llava_v1_5_mix665k.json
    python benchmarks/llava_rows.py --rows 66530    # a tenth

The file is synthetic but has the published file's shape: about 94% of rows with an image
(``image``: a relative path) and 6% text-only (no ``image`` key), 1-20 turns per row alternating
``human``/``gpt``, ``<image>`` at the start or the end of the first human turn, ids, and
answers of LLaVA's lengths. Images are 500 small PNG files that the rows reuse (start-up checks
each row's file exists; nothing is decoded before a sample is drawn).

Measured, each printed: the JSON parse into records (``read_llava``), the stage's checks over every
row (``StageDataset``: file exists, placeholders match, token count with the media tokens against
``processor.max_length``), and the process's peak resident memory after each, against its size
before (``ru_maxrss``). Then the same check as a training stage runs it, with the check cache
(``mmlm/data/check_cache.py``) and a check process per core: once to check and save, once more to
read it back.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORDS = (
    "the a image shows of in on with and is are what there this that man woman dog cat table red blue green "
    "street car people sitting standing holding looking picture color two three large small next left right"
).split()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_rows(path: Path, images: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    images.mkdir(parents=True, exist_ok=True)
    for i in range(500):
        Image.new("RGB", (32, 32), (i % 256, 0, 0)).save(images / f"{i:012d}.png")
    rng = random.Random(seed)
    with path.open("w") as f:
        f.write("[")
        for i in range(n):
            turns = []
            pairs = rng.choice([1, 1, 1, 2, 3, 4, 5, 8, 10])
            for _ in range(pairs):
                q = sentence(rng, 5, 20) + "?"
                turns.append({"from": "human", "value": q})
                turns.append({"from": "gpt", "value": sentence(rng, 3, 60) + "."})
            row = {"id": f"{i:09d}"}
            if rng.random() < 0.94:
                first = turns[0]["value"]
                turns[0]["value"] = f"<image>\n{first}" if rng.random() < 0.7 else f"{first}\n<image>"
                row["image"] = f"coco/train2017/{rng.randrange(500):012d}.png"
            row["conversations"] = turns
            f.write(("," if i else "") + json.dumps(row))
        f.write("]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=665_298)
    ap.add_argument("--workdir", default=None, help="where the synthetic file is written (default: a temp folder)")
    args = ap.parse_args()

    import torch
    from parts import tiny_vit

    import mmlm
    from mmlm.config import parse_config
    from mmlm.data.dataset import StageDataset
    from mmlm.data.sources import LlavaOptions, read_llava

    torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llava665k-"))
    path = work / "llava_v1_5_mix665k.json"
    t = time.perf_counter()
    write_rows(path, work / "coco" / "train2017", args.rows)
    print(f"wrote {args.rows} rows, {path.stat().st_size / 2**20:.0f} MiB, in {time.perf_counter() - t:.1f}s")

    cfg = parse_config(
        {
            "name": "rows",
            "model": {
                "encoders": {"image": tiny_vit(32, 32, 1)},
                "connectors": {"image": {"type": "mlp", "depth": 2}},
                "llm": {
                    "type": "scratch",
                    "config": {
                        "model_type": "llama",
                        "hidden_size": 32,
                        "intermediate_size": 64,
                        "num_hidden_layers": 1,
                        "num_attention_heads": 2,
                        "num_key_value_heads": 2,
                    },
                    "tokenizer": {"type": "word", "vocab_size": 256},
                },
            },
            "processor": {"max_length": 2048},
        }
    )
    model = mmlm.build(cfg, texts=[" ".join(WORDS)])
    base = rss_mib()
    print(f"process before reading: peak RSS {base:.0f} MiB")
    t = time.perf_counter()
    recs = read_llava(LlavaOptions(path=str(path), image_root=str(work)))
    parse_s = time.perf_counter() - t
    after_parse = rss_mib()
    grown = after_parse - base
    print(f"read_llava: {len(recs)} records in {parse_s:.1f}s; peak RSS {after_parse:.0f} MiB (+{grown:.0f})")
    t = time.perf_counter()
    ds = StageDataset(recs, model.processor, "skip", name="mix665k")
    check_s = time.perf_counter() - t
    after_check = rss_mib()
    with_image = sum(1 for r in ds.records if r.images)
    print(
        f"StageDataset: {len(ds)} samples ({with_image} with an image, {len(ds) - with_image} text-only) checked in "
        f"{check_s:.1f}s; skipped {dict(ds.skipped)}; peak RSS {after_check:.0f} MiB (+{after_check - base:.0f})"
    )
    print(
        f"start-up total {parse_s + check_s:.1f}s; {(after_check - base) * 2**20 / max(1, len(recs)):.0f} bytes of "
        f"peak memory per row; images decoded: 0 (each is read when its sample is drawn)"
    )
    # what a training stage does (cache=True, a worker per core): the first check runs in forked
    # processes and saves its results, the next reads them
    os.environ["MMLM_CACHE"] = str(work / "cache")
    workers = os.cpu_count() or 1
    for what in (f"first stage start ({workers} processes check, then save)", "next stage start or resume (reads it)"):
        t = time.perf_counter()
        again = StageDataset(recs, model.processor, "skip", name="mix665k", cache=True, workers=workers)
        print(f"StageDataset with the check cache, {what}: {time.perf_counter() - t:.1f}s ({len(again)} samples)")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS of the largest check process: {children:.0f} MiB (the parent's: {rss_mib():.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
