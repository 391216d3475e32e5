"""``mmlm demo``: generate the shapes world, train ``configs/shapes-tiny.yaml`` stage by stage,
evaluate on a held-out split and write ``metrics.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmlm.config import load_config
from mmlm.data.dataset import StageDataset
from mmlm.data.sources import read_source
from mmlm.evaluate import evaluate, image_use
from mmlm.train.runner import train

DEMO_CONFIG = "shapes-tiny.yaml"
SMOLLM2_CONFIG = "shapes-smollm2.yaml"  # the same world with the pretrained SmolLM2-135M-Instruct


def run_demo(out: str | Path = "runs/demo", overrides=(), reporter=None, config: str = DEMO_CONFIG) -> dict:
    t0 = time.time()
    out = Path(out)
    cfg = load_config(config, overrides, variables={"out": str(out)})
    model = train(cfg, out, resume=True, reporter=reporter)
    ev = cfg.train.eval
    records = [r for j, src in enumerate(ev.data) for r in read_source(src, f"train.eval.data.{j}")]
    data = StageDataset(records, model.processor, "skip", name="heldout")
    result = evaluate(model, data, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens)
    use = image_use(model, data, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens)
    wall = time.time() - t0
    mfile = out / "metrics.json"
    metrics = json.loads(mfile.read_text()) if mfile.is_file() else {}
    curve = [pt for st in cfg.train.stages for pt in metrics.get("stages", {}).get(st.name, {}).get("curve", [])]
    metrics.update(
        {
            "vqa_accuracy": result["vqa_accuracy"],
            "n_eval": result["n_eval"],
            "by_type": result["by_type"],
            "n_by_type": result["n_by_type"],
            "wall_seconds": round(wall, 1),
            "train_seconds": round(sum(s.get("seconds", 0) for s in metrics.get("stages", {}).values()), 1),
            "curve": curve,
            "checkpoint": str(out / "final"),
        }
    )
    if use["n_eval"]:
        metrics["image_use"] = use
    by_modality = modality_accuracy(result)
    if len(by_modality) > 1:
        metrics["by_modality"] = by_modality
    mfile.write_text(json.dumps(metrics, indent=2))
    return metrics


AUDIO_CONFIG = "shapes-audio.yaml"
VIDEO_CONFIG = "shapes-video.yaml"
MODALITY_OF_TYPE = {
    **{t: "image" for t in ("color", "shape", "count", "position", "exists")},
    **{t: "audio" for t in ("pitch", "beeps", "contour", "timbre")},
    **{t: "video" for t in ("direction", "event", "clip_shape", "clip_color")},
}


def modality_accuracy(result: dict) -> dict[str, dict]:
    """Held-out accuracy per modality, from the per-type accuracies weighted by their counts."""
    acc: dict[str, list[float]] = {}
    for t, a in result["by_type"].items():
        m = MODALITY_OF_TYPE.get(t)
        n = result.get("n_by_type", {}).get(t, 0)
        if m and n:
            acc.setdefault(m, [0.0, 0])
            acc[m][0] += a * n
            acc[m][1] += n
    return {m: {"accuracy": round(c / n, 4), "n": n} for m, (c, n) in acc.items()}


EMBED_CONFIG = "shapes-embed.yaml"
EMBED_EVAL_SEED = 5001  # retrieval tasks: images from seeds the pairs (4001) and the chat demo (1, 1001) never use
EMBED_PAIRS_SEED = 4001


def run_embed_demo(
    out: str | Path = "runs/demo",
    overrides=(),
    reporter=None,
    config: str = EMBED_CONFIG,
    n_eval: int = 200,
    n_pairs: int = 3000,
    candidates: int = 100,
) -> dict:
    """After the chat demo in ``out``: write the shapes world's retrieval tasks and training pairs,
    evaluate the chat model's training-free embeddings, train the contrastive stage into
    ``out/embed`` and evaluate again. Returns (and writes to ``out/embed/metrics.json``) P@1, R@5,
    nDCG@10 and MRR per task, before and after."""
    from mmlm.checkpoint import load_as
    from mmlm.data.shapes_retrieval import generate_pairs, generate_retrieval
    from mmlm.embed.retrieval import evaluate_retrieval

    t0 = time.time()
    emb = Path(out) / "embed"
    size = 96  # the chat demo's image size
    tasks_dir, pairs_dir = emb / "data" / "retrieval", emb / "data" / "pairs"
    if not (tasks_dir / "info.json").is_file():
        info = generate_retrieval(tasks_dir, n_eval, seed=EMBED_EVAL_SEED, candidates=candidates, image_size=size)
        (tasks_dir / "info.json").write_text(json.dumps(info, indent=2))
    if not (pairs_dir / "info.json").is_file():
        info = generate_pairs(pairs_dir, n_pairs, seed=EMBED_PAIRS_SEED, image_size=size)
        (pairs_dir / "info.json").write_text(json.dumps(info, indent=2))
    cfg = load_config(config, overrides, variables={"out": str(emb)})
    tasks = sorted(tasks_dir.glob("*.jsonl"))

    def table(model) -> dict:
        return {f.stem: evaluate_retrieval(model, f, batch_size=64) for f in tasks}

    before = table(load_as(cfg.train.init_from, cfg))
    model = train(cfg, emb, resume=True, reporter=reporter)
    after = table(model)
    result = {
        "tasks": {name: {"before": before[name]["overall"], "after": after[name]["overall"]} for name in before},
        "skipped": {name: after[name]["skipped"]["count"] for name in after},
        "candidates": candidates,
        "wall_seconds": round(time.time() - t0, 1),
        "checkpoint": str(emb / "final"),
    }
    mfile = emb / "metrics.json"
    metrics = json.loads(mfile.read_text()) if mfile.is_file() else {}
    metrics["retrieval"] = result
    mfile.write_text(json.dumps(metrics, indent=2))
    return result
