"""Packing against padding on LLaVA-1.5-mix-shaped lengths: micro-batches of 16 samples drawn from a
synthetic llava_v1_5_mix665k-shaped file (1-10 turns, 94% with an image), trained unpacked (padded
to the longest sample) and packed (``packing: true``, rows of ``processor.max_length`` tokens), with
the same model and samples. Prints the rows and padded positions per micro-batch and the time of a
forward and backward pass of each, as a ratio against padding measured in the same run.

    python benchmarks/packing.py                        # a 4-layer 256-wide Llama, 144 visual tokens
    python benchmarks/packing.py --batches 20 --threads 2

The model is small so that CPU runs finish; the work saved is attention and MLP over padding, the
same share for any model of the same sequence lengths.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=None, help="pack_tokens (default: processor.max_length, 2048)")
    args = ap.parse_args()

    import torch
    from llava_rows import WORDS, write_rows
    from parts import tiny_vit

    from mmlm.config import parse_config
    from mmlm.data.dataset import StageDataset
    from mmlm.data.sources import LlavaOptions, read_llava
    from mmlm.model import build
    from mmlm.objectives.lm import causal_lm_loss

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="packing-"))
    rows = work / "mix.json"
    write_rows(rows, work / "coco" / "train2017", args.batches * args.batch_size)
    cfg = parse_config(
        {
            "name": "packing",
            "model": {
                "encoders": {"image": tiny_vit(96)},
                "connectors": {"image": {"type": "mlp", "depth": 2}},
                "llm": {
                    "type": "scratch",
                    "config": {
                        "model_type": "llama",
                        "hidden_size": 256,
                        "intermediate_size": 688,
                        "num_hidden_layers": 4,
                        "num_attention_heads": 4,
                        "num_key_value_heads": 4,
                        "max_position_embeddings": 2048,
                    },
                    "tokenizer": {"type": "word", "vocab_size": 256},
                },
            },
            "processor": {"max_length": 2048},
        }
    )
    torch.manual_seed(0)
    model = build(cfg, texts=[" ".join(WORDS)])
    model.train()
    data = StageDataset(read_llava(LlavaOptions(path=str(rows), image_root=str(work))), model.processor, "skip")
    budget = args.budget or model.processor.config.max_length

    def step(batch) -> float:
        t = time.perf_counter()
        out = model(**model.inputs(batch))
        causal_lm_loss(out.logits, batch["labels"]).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times = {"padded": [], "packed": []}
    shape = {"padded": [], "packed": []}
    real = []
    for b in range(args.batches):
        enc = [data.load(b * args.batch_size + j) for j in range(args.batch_size)]
        real.append(sum(len(e.input_ids) for e in enc))
        batches = {"padded": model.processor.collate(enc), "packed": model.processor.collate_packed(enc, budget)}
        for kind in ("padded", "packed") if b % 2 else ("packed", "padded"):  # alternate which goes first
            times[kind].append(step(batches[kind]))
            shape[kind].append(tuple(batches[kind]["input_ids"].shape))
    print(
        f"{args.batches} micro-batches of {args.batch_size} samples, rows of {budget} tokens when packed, "
        f"{args.threads} thread(s), this machine's CPU"
    )
    for kind in ("padded", "packed"):
        positions = [r * w for r, w in shape[kind]]
        pad = 1 - sum(real) / sum(positions)
        rows_ = statistics.mean(r for r, _ in shape[kind])
        print(
            f"{kind}: {rows_:.1f} rows x {statistics.mean(w for _, w in shape[kind]):.0f} positions on average, "
            f"{pad:.0%} of them padding; forward+backward median {statistics.median(times[kind]) * 1e3:.0f} ms"
        )
    ratio = statistics.median(times["packed"]) / statistics.median(times["padded"])
    speed = sum(real) / sum(times["packed"]) / (sum(real) / sum(times["padded"]))
    print(f"packed / padded time: {ratio:.2f}x (median); real tokens per second: {speed:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
