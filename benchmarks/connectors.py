"""Train every connector recipe on the shapes world with the same budget, with and without the SEA
objective, and compare them.

    python benchmarks/connectors.py                 # the recipes' own step counts
    python benchmarks/connectors.py --steps 300     # every stage of every recipe runs 300 steps
    python benchmarks/connectors.py --quick         # a few steps on a tiny world: a smoke test

For each recipe and each objective set (``lm`` alone; ``lm`` + ``sea`` with the demo's settings,
in every stage): train all its stages (``mmlm.train.runner.train``; no evaluation during training),
save and reload the final checkpoint and check that the reloaded model gives identical logits and
the same answer, then answer the held-out questions (``mmlm.evaluate.evaluate``). Prints a markdown
table (connector, objectives, connector parameters, tokens per image, mean optimizer-step time,
held-out VQA accuracy, reload check) and writes it, with the machine it ran on, to
``benchmarks/results/connectors.md`` (``--quick`` writes only where ``--results`` says). A pairing
the config refuses (SEA needs a square grid of tokens; Ovis adds two indicator tokens) is listed
with the reason.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPES = [
    "shapes-mlp",  # with the sea objective, this is the demo recipe (shapes-tiny)
    "shapes-qformer",
    "shapes-resampler",
    "shapes-pixel_shuffle",
    "shapes-alignvlm",
    "shapes-ovis",
    "shapes-fusion",
]
OBJECTIVES = {
    "lm": "[{type: lm}]",
    "lm + sea": "[{type: lm}, {type: sea, weight: 1.0, temperature: 0.1}]",  # as in configs/shapes-tiny.yaml
}


class StepTimer:
    """A runner reporter that keeps the wall time of every optimizer step."""

    def __init__(self, verbose: bool = True):
        self.times: list[float] = []
        self.verbose = verbose
        self._last = None

    def stage_start(self, name, total, start, info):
        self._last = time.perf_counter()
        self._every = info.get("log_every", 50)  # the loss given is the mean over these steps
        if self.verbose:
            print(f"  stage {name}: {total} steps, {info.get('samples')} samples", file=sys.stderr, flush=True)

    def step(self, name, step, total, loss, tokens_per_s, lr):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        if self.verbose and (step == total or step % self._every == 0):
            print(f"    {name} {step}/{total} loss {loss:.3f}", file=sys.stderr, flush=True)

    def eval(self, name, step, metrics):
        pass

    def stage_end(self, name, summary):
        pass


def overrides_for(cfg, steps: int | None, quick: bool) -> list[str]:
    """``--set``-style overrides giving every recipe the same budget (and no evaluation while training)."""
    ov = []
    for st in cfg.train.stages:
        k = f"train.stages.{st.name}"
        ov += [f"{k}.eval_every=null", f"{k}.save_every=1000000000"]
        if quick:
            ov += [f"{k}.batch_size=4"]
            ov += [f"{k}.data.{j}.n=48" for j, src in enumerate(st.data) if src.format == "shapes"]
        if steps is not None:
            ov += [
                f"{k}.steps={steps}",
                f"{k}.epochs=null",
                f"{k}.warmup_steps={min(st.warmup_steps, max(0, steps // 10))}",
            ]
    if quick and cfg.train.eval is not None:
        ov += ["train.eval.max_questions=16", "train.eval.batch_size=16"]
        ov += [f"train.eval.data.{j}.n=12" for j, src in enumerate(cfg.train.eval.data) if src.format == "shapes"]
    return ov


def connector_label(cfg) -> str:
    comp = cfg.model.connectors["image"]
    label = comp.type
    layers = cfg.model.encoders["image"].options().get("select_layers")
    if layers and len(layers) > 1:
        label += f" + {comp.options().get('fusion')} fusion of layers {layers}"
    return label


def reload_check(model, run_dir: Path, data) -> bool:
    """The final checkpoint, loaded anew, gives identical logits and the same answer."""
    import torch

    from mmlm.checkpoint import load
    from mmlm.evaluate import questions_from

    again = load(run_dir / "final")
    q = questions_from(data.records)[0]
    images = data.images(q.record)
    enc = [model.processor.encode(q.messages, {"image": images}, add_generation_prompt=True)]
    batch = model.processor.collate(enc, padding_side="left")
    with torch.no_grad():
        same_logits = torch.equal(model(**model.inputs(batch)).logits, again(**again.inputs(batch)).logits)
    same_answer = model.generate(batch, max_new_tokens=4) == again.generate(batch, max_new_tokens=4)
    return same_logits and same_answer


def run_recipe(
    recipe: str, objectives: str, out_root: Path, steps: int | None, quick: bool, extra: list[str], verbose: bool
) -> dict:
    import torch

    from mmlm.config import load_config
    from mmlm.data.dataset import StageDataset
    from mmlm.errors import ConfigError
    from mmlm.evaluate import evaluate
    from mmlm.train.runner import load_records, train

    variables = {"out": str(out_root)}  # shared data folder: every recipe trains on the same world
    base = load_config(recipe, extra, variables=variables)
    chosen = [f"train.stages.{st.name}.objectives={OBJECTIVES[objectives]}" for st in base.train.stages]
    cfg = load_config(recipe, [*extra, *chosen, *overrides_for(base, steps, quick)], variables=variables)
    row = {"recipe": cfg.name, "connector": connector_label(cfg), "objectives": objectives}
    run_dir = out_root / "runs" / f"{cfg.name}-{objectives.replace(' + ', '-')}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    timer = StepTimer(verbose)
    t0 = time.perf_counter()
    try:
        model = train(cfg, run_dir, reporter=timer)
    except ConfigError as err:
        return {**row, "refused": str(err)}
    train_s = time.perf_counter() - t0
    ev = cfg.train.eval
    if ev is None:
        raise SystemExit(f"{recipe}: the recipe has no train.eval section to measure held-out accuracy")
    recs = load_records(ev.data, "train.eval.data", {})
    data = StageDataset(recs, model.processor, "skip", name="eval")
    model.eval()
    reloaded = reload_check(model, run_dir, data)
    t1 = time.perf_counter()
    metrics = evaluate(
        model, data, max_questions=ev.max_questions, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens
    )
    eval_s = time.perf_counter() - t1
    conn = model.connectors["image"]
    return {
        **row,
        "params": sum(p.numel() for p in conn.parameters()),
        "tokens": model.processor.media["image"].num_tokens,
        "steps": len(timer.times),
        "step_s": sum(timer.times) / max(1, len(timer.times)),
        "train_s": train_s,
        "eval_s": eval_s,
        "accuracy": metrics["vqa_accuracy"],
        "n_eval": metrics["n_eval"],
        "by_type": metrics["by_type"],
        "reload_identical": reloaded,
        "threads": torch.get_num_threads(),
    }


def machine_line() -> str:
    import torch

    return (
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(torch threads {torch.get_num_threads()}), torch {torch.__version__}, Python {platform.python_version()}"
        + (f", CUDA device {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", CPU only")
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| connector | objectives | recipe | parameters (connector) | tokens per image | mean step time (s) "
        "| held-out VQA accuracy | reload: same logits and answer |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['connector']} | {r['objectives']} | {r['recipe']} | refused: {r['refused']} |||||")
            continue
        lines.append(
            f"| {r['connector']} | {r['objectives']} | {r['recipe']} | {r['params']:,} | {r['tokens']} | "
            f"{r['step_s']:.3f} | {r['accuracy']:.3f} ({r['n_eval']} q) | {'yes' if r['reload_identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=RECIPES, help="recipe names or YAML paths")
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps for every stage of every recipe")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 steps per stage, a tiny world, 16 questions")
    ap.add_argument("--out", default=None, help="run folder (default runs/bench-connectors[-quick])")
    ap.add_argument(
        "--results", default=None, help="markdown output (default benchmarks/results/connectors.md; none with --quick)"
    )
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra key.path=value override for every recipe"
    )
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.quick else None)
    out_root = Path(
        args.out or ROOT / "runs" / ("bench-connectors-quick" if args.quick else "bench-connectors")
    ).resolve()
    results = args.results or (None if args.quick else str(HERE / "results" / "connectors.md"))

    rows = []
    for recipe in args.recipes:
        for objectives in args.objectives:
            if not args.quiet:
                print(f"== {recipe} ({objectives})", file=sys.stderr, flush=True)
            rows.append(
                run_recipe(recipe, objectives, out_root, steps, args.quick, args.overrides, verbose=not args.quiet)
            )
            print(table(rows[-1:]), file=sys.stderr, flush=True)
    budget = (
        f"{steps} steps per stage"
        if steps is not None
        else "each recipe's own step counts" + (" with the overrides above" if args.overrides else "")
    )
    doc = "\n".join(
        [
            "# Connector benchmark (shapes world)",
            "",
            f"Run {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with `python benchmarks/connectors.py"
            + (" --quick" if args.quick else "")
            + (f" --steps {args.steps}" if args.steps is not None else "")
            + "".join(f" --set {o}" for o in args.overrides)
            + "`: "
            f"{budget}, same data, learning rate and batch for every recipe; mean step time over all optimizer steps; "
            "held-out accuracy is exact match on greedy answers.",
            "",
            machine_line(),
            "",
            table(rows),
            "",
        ]
    )
    print(doc)
    if results:
        p = Path(results)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(doc)
        print(f"written to {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
