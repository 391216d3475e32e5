"""Token reduction: what each method saves and what it costs, against no reduction in the same run.

    python benchmarks/token_reduction.py   # after `mmlm train configs/shapes-144.yaml` and
    #                                        `mmlm train configs/shapes-144-tome.yaml --out runs/shapes-144/tome`
    python benchmarks/token_reduction.py --checkpoint runs/shapes-144/final --tuned runs/shapes-144/tome/final

Two models, each measured for every method (tome, visionzip, fastv, aim) at keep 1, 0.5 and 0.25:

- ``shapes-144``: the trained checkpoint of configs/shapes-144.yaml (144 visual tokens per image,
  a 4-layer 128-wide LLM); reduction applied without retraining, plus (``--tuned``) the same model
  fine-tuned with ToMe on at keep 0.25 (configs/shapes-144-tome.yaml);
- ``llava-0.5b-shape``: random weights shaped like LLaVA-OneVision-0.5B's main cost: a ViT-S/16
  at 384 px (576 tokens) and a Qwen2-0.5B-shaped LLM (24 layers, width 896, 14 heads, 2 KV heads).

Figures, each a ratio against no reduction measured in the same run:

- LLM prefill FLOPs (analytic, per sample): every layer's linear layers and attention for the
  tokens it reads, the pruning layers' explicit score attention, the LM head for the last token;
- prefill latency: ``generate`` of one token for a batch (encoder, merging and LLM), median, and
  the LLM's part alone (the prefill forward from the input embeddings);
- decode tokens/s: ``generate`` of 16 tokens with stop tokens ignored, the prefill's time taken out;
- held-out VQA exact-match accuracy (shapes-144 only; points against no reduction).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("tome", "visionzip", "fastv", "aim")
DTYPE: list = [None]  # autocast dtype for every forward (--dtype); None: the weights' own
KEEPS = (1.0, 0.5, 0.25)

BIG = {
    "name": "llava-0.5b-shape",
    "model": {
        "encoders": {
            "image": {
                "type": "timm",
                "model_name": "vit_small_patch16_384",
                "img_size": 384,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
            }
        },
        "connectors": {"image": {"type": "mlp", "depth": 2}},
        "llm": {
            "type": "scratch",
            "config": {
                "model_type": "qwen2",
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "max_position_embeddings": 2048,
                "tie_word_embeddings": True,
            },
            "tokenizer": {"type": "word", "vocab_size": 256},
        },
    },
    "processor": {"max_length": 1024},
}


def reduction_sets(method: str | None, keep: float) -> list[str]:
    if method is None:
        return []
    return [f"model.token_reduction.image.type={method}", f"model.token_reduction.image.keep={keep}"]


def llm_flops(model, n_text: int, n_media_llm: int) -> float:
    """Analytic prefill FLOPs of the LLM for one sample of ``n_text`` text and ``n_media_llm``
    media tokens (after merging), following the model's pruning schedule."""
    from mmlm.reduce._base import keep_count
    from mmlm.reduce._prune import decoder_layers

    layers = decoder_layers(model.llm)
    cfg = model.llm.config
    d = cfg.hidden_size
    red = model.reducers["image"] if "image" in model.reducers else None
    schedule = red.keep_schedule(len(layers)) if red is not None else {}
    per_layer = sum(p.numel() for n, p in layers[0].named_parameters() if p.dim() == 2)
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    qk = (cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim
    total, frac = 0.0, 1.0
    for i in range(len(layers)):
        s_in = n_text + keep_count(n_media_llm, frac)
        if i in schedule:  # the explicit score attention on the tokens entering the layer
            total += 2 * s_in * d * qk + 2 * s_in * s_in * cfg.num_attention_heads * head_dim
            frac = schedule[i]
        s = n_text + keep_count(n_media_llm, frac)
        total += 2 * s * per_layer + 4 * s * s * cfg.num_attention_heads * head_dim
    return total + 2 * d * cfg.vocab_size  # the LM head, for the last position only


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure(model, batch, repeats: int, decode_tokens: int) -> dict:
    import torch

    batch = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad(), torch.autocast(model.device.type, dtype=DTYPE[0], enabled=DTYPE[0] is not None):
        prefill = median_time(lambda: model.generate(batch, max_new_tokens=1), repeats)
        embeds, _ = model.embed_inputs(ids, batch)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)

        def llm_only():
            with model.pruning(ids, mask):
                model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)

        llm = median_time(llm_only, repeats)
        stops = model.processor.stop_token_ids
        model.processor.stop_token_ids = lambda: set()  # decode all the tokens asked for
        try:
            full = median_time(lambda: model.generate(batch, max_new_tokens=decode_tokens), max(1, repeats // 2))
        finally:
            model.processor.stop_token_ids = stops
    rate = ids.shape[0] * (decode_tokens - 1) / max(full - prefill, 1e-9)
    return {"prefill_s": prefill, "llm_prefill_s": llm, "decode_tok_s": rate}


def shapes_batch(model, rows, data: Path, n: int):
    from PIL import Image

    msgs = [[{"role": "user", "content": "<image>\n" + r["question"]}] for r in rows[:n]]
    media = [{"image": [Image.open(data / r["image"]).convert("RGB")]} for r in rows[:n]]
    return model.processor(msgs, media, add_generation_prompt=True, padding_side="left")


def accuracy(model, data: Path, max_questions: int) -> dict:
    from mmlm.data.dataset import StageDataset
    from mmlm.data.sources import LlavaOptions, read_llava
    from mmlm.evaluate import evaluate

    recs = read_llava(LlavaOptions(path=str(data / "questions.jsonl"), image_root=str(data)))
    ds = StageDataset(recs, model.processor, "skip", name="heldout")
    m = evaluate(model, ds, max_questions=max_questions, batch_size=100, max_new_tokens=4)
    return {"accuracy": m["vqa_accuracy"], "n": m["n_eval"], "by_type": m["by_type"]}


def run_model(label, load, batch_for, n_text_media, repeats, decode_tokens, acc=None, extra=(), keeps=KEEPS):
    """Every method and keep on one model; returns rows of figures (ratios against the first)."""
    rows = []
    base = None
    configs = [(None, 1.0)] + [(m, k) for m in METHODS for k in keeps] + list(extra)
    # a first, discarded pass on the unreduced model: the process's first forwards (allocator,
    # kernel choice) would otherwise slow the baseline and flatter every ratio against it
    warm, _ = load(None, 1.0)
    measure(warm, batch_for(warm), 1, 2)
    del warm
    for method, keep in configs:
        model, name = load(method, keep)
        batch = batch_for(model)
        n_text, n_media = n_text_media(model, batch)
        fig = measure(model, batch, repeats, decode_tokens)
        fig["flops"] = llm_flops(model, n_text, n_media)
        fig["media_tokens"] = n_media
        if acc is not None:
            fig.update(acc(model))
        if base is None:
            base = fig
        row = {"model": label, "method": name, "keep": keep, **fig}
        for k in ("flops", "prefill_s", "llm_prefill_s"):
            row[k + "_ratio"] = fig[k] / base[k]
        row["decode_ratio"] = fig["decode_tok_s"] / base["decode_tok_s"]
        if acc is not None:
            row["acc_points"] = 100 * (fig["accuracy"] - base["accuracy"])
        rows.append(row)
        line = (
            f"{label:<17} {name:<10} keep {keep:<4} media {n_media:>4}  FLOPs {row['flops_ratio']:.2f}x  "
            f"prefill {row['prefill_s'] * 1e3:8.1f} ms ({row['prefill_s_ratio']:.2f}x)  "
            f"LLM prefill {row['llm_prefill_s'] * 1e3:8.1f} ms ({row['llm_prefill_s_ratio']:.2f}x)  "
            f"decode {row['decode_tok_s']:7.1f} tok/s ({row['decode_ratio']:.2f}x)"
        )
        if acc is not None:
            line += f"  acc {row['accuracy']:.3f} ({row['acc_points']:+.1f})"
        print(line, flush=True)
        del model
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/shapes-144/final", help="a trained configs/shapes-144.yaml")
    ap.add_argument(
        "--tuned",
        action="append",
        default=None,
        help="the same model fine-tuned with a reducer on (its config names it); repeatable "
        "(default runs/shapes-144/tome/final)",
    )
    ap.add_argument("--data", default="runs/shapes-144/data/heldout")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch (shapes-144)")
    ap.add_argument("--questions", type=int, default=500, help="held-out questions per accuracy")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--skip-big", action="store_true", help="only the shapes-144 model")
    ap.add_argument("--skip-shapes", action="store_true", help="only the 0.5B-shaped model")
    ap.add_argument("--big-repeats", type=int, default=3, help="timed runs per figure on the 0.5B-shaped model")
    ap.add_argument("--results", default=None, help="write the tables here (markdown)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype of the forwards")
    args = ap.parse_args(argv)

    import torch
    import transformers

    import mmlm
    from mmlm.checkpoint import read_checkpoint_config
    from mmlm.config import parse_config

    torch.set_num_threads(args.threads)
    DTYPE[0] = torch.bfloat16 if args.dtype == "bf16" else None
    dev = args.device
    ckpt, data = Path(args.checkpoint), Path(args.data)
    if not (ckpt / "mmlm.yaml").is_file() or not (data / "questions.jsonl").is_file():
        raise SystemExit(f"{ckpt} or {data} is missing: train configs/shapes-144.yaml first (see the docstring)")
    questions = [json.loads(x) for x in (data / "questions.jsonl").read_text().splitlines()]

    def media_count(model, batch):
        spec = model.processor.media["image"]
        n_media = spec.num_tokens
        n_text = int(batch["attention_mask"][0].sum()) - n_media
        return n_text, n_media

    def load_shapes(method, keep):
        return mmlm.load(ckpt, overrides=tuple(reduction_sets(method, keep)), device=dev).eval(), method or "none"

    tuned = {}  # (label, keep) -> checkpoint fine-tuned with that reducer on
    for t in args.tuned or ["runs/shapes-144/tome/final"]:
        if not (Path(t) / "mmlm.yaml").is_file():
            print(f"no tuned checkpoint at {t}; left out")
            continue
        red = read_checkpoint_config(Path(t))[0].model.token_reduction.get("image")
        red = red.model_dump() if red is not None else {"type": "none", "keep": 1.0}
        keep = float(red.get("keep", 1.0))
        label = f"{red['type']}+train" if keep < 1 else "none+train"
        tuned[(label, keep)] = Path(t)
    extra = list(tuned)

    def load_any(method, keep):
        if (method, keep) in tuned:
            return mmlm.load(tuned[(method, keep)], device=dev).eval(), method
        return load_shapes(method, keep)

    rows = (
        []
        if args.skip_shapes
        else run_model(
            "shapes-144",
            load_any,
            lambda m: shapes_batch(m, questions, data, args.batch),
            media_count,
            args.repeats,
            args.decode_tokens,
            acc=lambda m: accuracy(m, data, args.questions),
            extra=extra,
        )
    )

    if not args.skip_big:
        from PIL import Image

        img = Image.open(data / questions[0]["image"]).convert("RGB")

        def load_big(method, keep):
            cfg = parse_config(json.loads(json.dumps(BIG)), reduction_sets(method, keep))
            torch.manual_seed(0)
            model = mmlm.build(cfg, texts=[q["question"] for q in questions[:200]]).to(dev).eval()
            return model, method or "none"

        def big_batch(model):
            msgs = [[{"role": "user", "content": "<image>\n" + questions[0]["question"]}]]
            return model.processor(msgs, [{"image": [img]}], add_generation_prompt=True, padding_side="left")

        # keep 1 is left out here (tests show it gives the logits of no reduction) but for AIM,
        # whose pruning runs at any merging ratio
        rows += run_model(
            "llava-0.5b-shape",
            load_big,
            big_batch,
            media_count,
            args.big_repeats,
            4,
            keeps=(0.5, 0.25),
            extra=[("aim", 1.0)],
        )

    if args.results:
        write_results(Path(args.results), rows, args, torch.__version__, transformers.__version__)
    return 0


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "CPU only"


def write_results(path: Path, rows: list[dict], args, torch_version: str, tf_version: str) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = [
        "# Token reduction: cost and accuracy against no reduction",
        "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `python benchmarks/token_reduction.py`.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} CPUs, {_device_name(args.device)}, {args.dtype}, "
        f"torch threads {args.threads}, "
        f"torch {torch_version}, "
        f"transformers {tf_version}, Python {platform.python_version()}; "
        f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        "",
        f"shapes-144: batch of {args.batch} held-out questions (one image each), accuracy on the first "
        f"{args.questions} held-out questions, {args.repeats} timed runs per figure (median); llava-0.5b-shape: "
        f"random weights, batch 1, {args.big_repeats} timed run(s) per figure, 4 decoded tokens. "
        "FastV prunes at layer 2; AIM's keep is its merging ratio, and it also prunes the second half of the LLM "
        "down to 0.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        acc = "accuracy" in sub[0]
        head = (
            "| method | keep | media tokens | LLM FLOPs | prefill ms | prefill | LLM prefill ms | LLM prefill "
            "| decode tok/s | decode |"
        )
        sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        if acc:
            head += " accuracy | points |"
            sep += "---:|---:|"
        out += [f"## {model}", "", head, sep]
        for r in sub:
            line = (
                f"| {r['method']} | {r['keep']:g} | {r['media_tokens']} | {r['flops_ratio']:.2f}x | "
                f"{r['prefill_s'] * 1e3:.1f} | {r['prefill_s_ratio']:.2f}x | {r['llm_prefill_s'] * 1e3:.1f} | "
                f"{r['llm_prefill_s_ratio']:.2f}x | {r['decode_tok_s']:.0f} | {r['decode_ratio']:.2f}x |"
            )
            if acc:
                line += f" {r['accuracy']:.3f} | {r['acc_points']:+.1f} |"
            out.append(line)
        out.append("")
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
