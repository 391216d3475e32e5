"""GPU checks and figures for mmlm (run on a CUDA machine; prints everything it measures).

1. attention selection: ``auto`` resolves to flash_attention_2 only when flash-attn is importable,
   and an explicit ``flash_attention_2`` without it fails with a clear message;
2. the demo recipe (configs/shapes-tiny.yaml) trained on the GPU in bf16 with the same steps as on
   CPU: wall time, step time, tokens/s, held-out accuracy by question type;
3. save -> load on the GPU gives identical logits; generation runs with the KV cache.

Usage: python benchmarks/gpu_check.py --out /tmp/gpu-demo [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/gpu-check")
    ap.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    import transformers

    from mmlm.checkpoint import load
    from mmlm.config import load_config
    from mmlm.data.dataset import StageDataset
    from mmlm.data.sources import read_source
    from mmlm.evaluate import evaluate
    from mmlm.llm import resolve_attn_implementation
    from mmlm.train.runner import train

    cuda = torch.cuda.is_available()
    print(
        f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}; torch {torch.__version__}; "
        f"transformers {transformers.__version__}; python {platform.python_version()}"
    )
    print("attn auto ->", resolve_attn_implementation("auto"))
    try:
        print("flash_attention_2 ->", resolve_attn_implementation("flash_attention_2"))
    except RuntimeError as err:
        print("flash_attention_2 refused:", err)

    overrides = [f"train.stages.{i}.precision={args.precision}" for i in range(8)]
    cfg0 = load_config("configs/shapes-tiny.yaml", variables={"out": args.out})
    overrides = overrides[: len(cfg0.train.stages)] + list(args.set)
    cfg = load_config("configs/shapes-tiny.yaml", overrides, variables={"out": args.out})
    t0 = time.time()
    model = train(cfg, args.out)
    wall = time.time() - t0
    metrics = json.load(open(f"{args.out}/metrics.json"))
    for name, st in metrics["stages"].items():
        print(
            f"stage {name}: {st['steps']} steps in {st['seconds']}s "
            f"({1000 * st['seconds'] / st['steps']:.1f} ms/step), "
            f"{st['tokens_per_s']} tok/s, final loss {st['final_loss']}"
        )
    ev = cfg.train.eval
    recs = [r for j, s in enumerate(ev.data) for r in read_source(s)]
    data = StageDataset(recs, model.processor, "skip")
    model.to("cuda" if cuda else "cpu")
    t1 = time.time()
    m = evaluate(model, data, batch_size=256, max_new_tokens=ev.max_new_tokens)
    print(
        f"held-out accuracy {m['vqa_accuracy']:.3f} on {m['n_eval']} questions ({time.time() - t1:.1f}s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in m["by_type"].items())
    )
    print(f"train wall {wall:.1f}s")

    again = load(f"{args.out}/final", device="cuda" if cuda else "cpu")
    enc = [model.processor.encode(q, {"image": [data.load(0).media["image"][0]]}) for q in [data.records[0].messages]]
    batch = {
        k: (v.to(again.device) if isinstance(v, torch.Tensor) else v) for k, v in model.processor.collate(enc).items()
    }
    with torch.no_grad():
        a = model(**model.inputs(batch)).logits
        b = again(**again.inputs(batch)).logits
    print("save -> load identical logits on", again.device, ":", bool(torch.equal(a, b)))


if __name__ == "__main__":
    main()
