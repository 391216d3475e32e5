"""Embedding throughput: mmlm's ``MultimodalLM.embed`` against Hugging Face transformers' Llava
running the same forward with the same weights, in the same process.

    python benchmarks/embed.py              # CPU, writes benchmarks/results/embed.md
    python benchmarks/embed.py --quick      # tiny sizes and one repeat: a smoke test (writes nothing)
    python benchmarks/embed.py --device cuda --results /tmp/embed-gpu.md

The pipeline is an hf tower + mlp projector + llama LLM, the shape ``LlavaForConditionalGeneration``
can hold: a CLIP vision tower built from a config (224 px, patch 16: 196 image tokens after CLS is
dropped, features of layer -2), a 2-layer GELU MLP, and a llama LLM from a ``scratch`` config. The
mmlm model is built first; its weights are copied into a ``LlavaForConditionalGeneration``
(encoder -> vision_tower, connector net.0/net.2 -> multi_modal_projector.linear_1/linear_2,
llm -> language_model, with one extra vocabulary row for Llava's image token, to which mmlm's
placeholder id -200 is mapped).

Both sides start from the same items (texts, PIL images, image + text) and go through the same
preparation (mmlm's prompt templates, tokenisation and image transform, ``processor.collate``), so the
ratio measures the model forward and pooling. mmlm: ``model.embed(items, batch_size=B)``. HF:
``LlavaModel.forward`` (``llava.model``, no lm_head) on those input ids, hidden state of the last real
token (right padding: ``attention_mask.sum - 1``), L2 normalisation. The script first asserts that
both give the same vectors (1e-4) on a batch of each kind, then times each cell (warm-up, repeats
alternating mmlm and HF; median) under ``torch.inference_mode`` with the same thread count, and
prints items/s and the ratio mmlm/HF per cell (the median of each repeat's paired ratio, with range).

Where mmlm is faster, it computes less for the same vectors: the vision tower stops at the deepest
selected block (layer -2: HF's Llava runs the last block and throws its output away), and last-token
pooling runs the LLM's last block's MLP at the pooled token only (``mmlm.llm.last_mlp_only_at``).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from mmlm.config import parse_config  # noqa: E402
from mmlm.embed.extract import as_item, prompts_for, read_image, render  # noqa: E402
from mmlm.model import build  # noqa: E402

KINDS = ("text", "image", "image+text")
BATCHES = (1, 8, 32)

# realistic for a small model (about 15 M parameters), fast enough on a shared 2-core CPU
SIZES = {
    "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
    "llm": dict(
        hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2
    ),
    "image_size": 224,
    "patch_size": 16,
}
QUICK = {
    "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    "llm": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
    "image_size": 64,
    "patch_size": 16,
}

WORDS = (
    "a red circle blue square green triangle on the left right top bottom of picture photo image small large "
    "dog cat runs across field park under tree near river bridge city street at night morning person holds "
    "umbrella in rain two three people sit bench train station market fruit stall what colour is how many "
    "where are they doing why does look like describe scene shows kitchen table cup coffee book open window"
).split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))) + "." for _ in range(n)]


def images(n: int, seed: int) -> list[Image.Image]:
    """Noise images of assorted sizes, so the processor resizes them as it would real photos."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(200, 320)), int(rng.integers(200, 320))
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


def items_of(kind: str, n: int, seed: int) -> list:
    if kind == "text":
        return sentences(n, seed)
    if kind == "image":
        return images(n, seed)
    return [{"image": im, "text": t} for im, t in zip(images(n, seed), sentences(n, seed + 1), strict=True)]


def pipeline_raw(sizes: dict) -> dict:
    return {
        "name": "embed-bench",
        "model": {
            "encoders": {
                "image": {
                    "type": "hf",
                    "config": {
                        "model_type": "clip_vision_model",
                        "image_size": sizes["image_size"],
                        "patch_size": sizes["patch_size"],
                        **sizes["vision"],
                    },
                    "select_layers": [-2],
                }
            },
            "connectors": {"image": {"type": "mlp", "depth": 2, "activation": "gelu"}},
            "llm": {
                "type": "scratch",
                "attn_implementation": "sdpa",
                "config": {"model_type": "llama", "max_position_embeddings": 1024, **sizes["llm"]},
                "tokenizer": {"type": "word", "vocab_size": 4096},
            },
            "embedding": {
                "query": {
                    "text": "{text}\nSummary above sentence in one word:",
                    "image": "<image>\nSummary above image in one word:",
                    "both": "<image>\n{text}\nSummary above image and sentence in one word:",
                }
            },
        },
        "processor": {"max_length": 512},
    }


def build_mmlm(sizes: dict, device: str):
    torch.manual_seed(0)
    model = build(parse_config(pipeline_raw(sizes)), texts=sentences(2000, 99) + WORDS)
    return model.to(device).eval()


def build_llava(model, device: str):
    """A LlavaForConditionalGeneration holding ``model``'s weights (``mmlm.zoo.llava_export``, the
    exporter's own in-memory model; its image token is one extra vocabulary row), and that token."""
    from mmlm.zoo.llava_export import build_llava as shared

    hf, image_token_id = shared(model)
    return hf.to(device).eval(), image_token_id


def prepare(model, items: list) -> dict:
    """The batch ``model.embed`` builds for ``items`` (the same prompt, tokens and pixels)."""
    cfg = model.config.model.embedding
    prompts, proc = prompts_for(cfg, "query"), model.processor
    encoded = []
    for j, raw in enumerate(items):
        item = as_item(raw, j)
        image = item.get("image")
        media = {"image": [read_image(image, proc.config.max_image_pixels)]} if image is not None else None
        encoded.append(proc.encode_prompt(render(item, prompts), media, cfg.chat_template, index=j))
    return proc.collate(encoded)


def hf_embed(hf, image_token_id: int, model, items: list, device: str) -> torch.Tensor:
    """Llava's base model on the batch mmlm would build: last real token, L2 normalised."""
    batch = prepare(model, items)
    ids = batch["input_ids"].clone()
    ids[ids == model.processor.media["image"].token_id] = image_token_id
    mask = batch["attention_mask"].to(device)
    pixels = batch.get("pixel_values")
    out = hf.model(
        input_ids=ids.to(device),
        attention_mask=mask,
        pixel_values=pixels.to(device) if pixels is not None else None,
        use_cache=False,
    )
    hidden = out.last_hidden_state
    last = mask.sum(dim=1) - 1  # right padding
    pooled = hidden[torch.arange(hidden.shape[0], device=device), last]
    return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_same(model, hf, image_token_id: int, device: str, n: int) -> dict[str, float]:
    """Largest absolute difference between the two sides' vectors, per kind; fails above 1e-4."""
    diffs = {}
    with torch.inference_mode():
        for kind in KINDS:
            items = items_of(kind, n, seed=7)
            ours = model.embed(items, batch_size=n)
            theirs = hf_embed(hf, image_token_id, model, items, device)
            diff = (ours - theirs).abs().max().item()
            diffs[kind] = diff
            if not diff <= 1e-4:
                raise SystemExit(f"{kind}: mmlm and HF vectors differ by {diff:.2e} (> 1e-4); the comparison is void")
            # distinct items must get distinct vectors, or the equality would say little
            cos = ours @ ours.T
            if (cos - 2 * torch.eye(n)).max().item() > 1 - 1e-6:
                raise SystemExit(f"{kind}: two different items got the same vector; the check is void")
    return diffs


def time_cell(fns: dict, repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each function, repeat by repeat, the functions alternating within a repeat
    (so that each repeat's calls share the machine's load of that moment)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for r in range(repeats):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))
            for k in order:
                sync(device)
                t = time.perf_counter()
                fns[k]()
                sync(device)
                times[k].append(time.perf_counter() - t)
    return times


HEADER = (
    "| input | batch | tokens/item | mmlm items/s | HF items/s | mmlm / HF (range) | repeats | prep s/batch |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(row) -> str:
    kind, B, tokens, ours, theirs, ratio, ratios, prep = row
    spread = f"{ratio:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
    return f"| {kind} | {B} | {tokens:.0f} | {ours:.1f} | {theirs:.1f} | {spread} | {len(ratios)} | {prep:.3f} |"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str) -> str:
    import transformers

    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU only"
    return (
        f"{cpu_model()}, {os.cpu_count()} CPUs (torch threads {torch.get_num_threads()}), {platform.platform()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"{where}"
    )


def describe(model, sizes: dict) -> str:
    v, m = sizes["vision"], sizes["llm"]
    n_img = model.encoders["image"].num_tokens
    params = sum(p.numel() for p in model.parameters())
    return (
        f"CLIP vision tower {v['num_hidden_layers']} layers x {v['hidden_size']} at {sizes['image_size']} px / patch "
        f"{sizes['patch_size']} ({n_img} image tokens, layer -2, CLS dropped), mlp projector (2 Linear, GELU), "
        f"llama {m['num_hidden_layers']} layers x {m['hidden_size']} (GQA {m['num_attention_heads']}/"
        f"{m['num_key_value_heads']} heads, vocabulary {len(model.tokenizer)}), {params / 1e6:.1f} M parameters, "
        f"float32, sdpa attention; E5-V-style one-word-summary prompts in the chat template, last-token pooling"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, one repeat, nothing written")
    ap.add_argument("--device", default="cpu")
    # one thread by default: on a shared machine, two OpenMP threads on two busy cores wait on each other at
    # every op (a 25-token forward measured 0.1 s with one thread and 0.3-1.7 s with two)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per cell and side (default 9/7/5 by batch)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--results", default=None, help="markdown file to write (default benchmarks/results/embed.md)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else SIZES
    batches = [int(b) for b in args.batches.split(",")]
    model = build_mmlm(sizes, args.device)
    hf, image_token_id = build_llava(model, args.device)
    print(describe(model, sizes), flush=True)

    diffs = check_same(model, hf, image_token_id, args.device, n=8)
    print("same vectors (max |mmlm - HF|): " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)

    rows = []
    print("\n" + HEADER, flush=True)
    for kind in KINDS:
        for B in batches:
            items = items_of(kind, B, seed=11 + B)
            repeats = args.repeats or (1 if args.quick else {1: 9, 8: 7}.get(B, 5))
            fns = {
                "mmlm": lambda items=items, B=B: model.embed(items, batch_size=B),
                "hf": lambda items=items: hf_embed(hf, image_token_id, model, items, args.device),
                "prep": lambda items=items: prepare(model, items),
            }
            times = time_cell(fns, repeats, warmup=1 if B > 1 or args.quick else 2, device=args.device)
            t = {k: statistics.median(v) for k, v in times.items()}
            # the ratio of each repeat's pair of calls, then their median: load that changes during the run
            # moves both calls of a pair alike
            ratios = sorted(h / m for m, h in zip(times["mmlm"], times["hf"], strict=True))
            tokens = int(prepare(model, items)["attention_mask"].sum()) / B
            row = (kind, B, tokens, B / t["mmlm"], B / t["hf"], statistics.median(ratios), ratios, t["prep"])
            rows.append(row)
            print(format_row(row), flush=True)

    if args.quick and args.results is None:
        return 0
    out = Path(args.results) if args.results else HERE / "results" / "embed.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/embed.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    lines = [
        "# Embedding throughput: mmlm against transformers' Llava",
        "",
        f"Run {stamp} with `{cmd}`.",
        "",
        f"Machine: {machine_line(args.device)}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (a shared machine: other work ran beside it).",
        "",
        f"Model: {describe(model, sizes)}.",
        "",
        "Both sides embed the same items through the same preparation (mmlm's templates, tokeniser and image "
        "transform; the last column is its time alone, included in both); mmlm runs `model.embed`, HF runs "
        "`LlavaForConditionalGeneration.model` (no lm_head) with the same weights, last real token, L2 "
        "normalisation, `use_cache=False`. mmlm computes less for the same vectors: its vision tower stops at "
        "the deepest selected block (HF runs the last block and discards it) and last-token pooling runs the "
        "last LLM block's MLP at the pooled token only. Both under `torch.inference_mode`, same threads. "
        "After a warm-up, "
        "each repeat calls both sides back to back (order alternating); items/s from the median call, "
        "mmlm / HF the median of the repeats' ratios (HF seconds / mmlm seconds) with their range: on a "
        "loaded machine the range shows the noise. Checked first: max |mmlm - HF| over a batch of 8 "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        + ".",
        "",
        HEADER,
        *(format_row(row) for row in rows),
    ]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
