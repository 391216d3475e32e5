"""``mmlm demo``: generate the shapes world, train ``configs/shapes-tiny.yaml`` stage by stage,
evaluate on a held-out split and write ``metrics.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmlm.config import load_config
from mmlm.data.dataset import StageDataset
from mmlm.data.sources import read_source
from mmlm.evaluate import evaluate
from mmlm.train.runner import train

DEMO_CONFIG = "shapes-tiny.yaml"


def run_demo(out: str | Path = "runs/demo", overrides=(), reporter=None, config: str = DEMO_CONFIG) -> dict:
    t0 = time.time()
    out = Path(out)
    cfg = load_config(config, overrides, variables={"out": str(out)})
    model = train(cfg, out, resume=True, reporter=reporter)
    ev = cfg.train.eval
    records = [r for j, src in enumerate(ev.data) for r in read_source(src, f"train.eval.data.{j}")]
    data = StageDataset(records, model.processor, "skip", name="heldout")
    result = evaluate(model, data, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens)
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
    mfile.write_text(json.dumps(metrics, indent=2))
    return metrics
