"""Run the stages a pipeline config declares, in order, on accelerate.

Layout of a run directory::

    OUT/config.yaml          the resolved config of the run
    OUT/init/                the model as built before any stage (so a resumed run starts identically)
    OUT/state/STAGE/         the last saved step of an unfinished stage (weights, optimizer, step)
    OUT/stages/STAGE/        each finished stage's checkpoint
    OUT/final -> stages/LAST
    OUT/metrics.json         per-stage summaries, evaluation and accuracy curve
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from mmlm.config import ConfigError, PipelineConfig, StageConfig
from mmlm.data.dataset import StageDataset
from mmlm.data.sources import read_source
from mmlm.processor import SampleError
from mmlm.train.checkpoint import load_checkpoint, load_train_state, save_checkpoint, save_train_state
from mmlm.train.freeze import apply_trainable, param_groups
from mmlm.train.schedule import lr_factor

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def stage_start(self, name: str, total: int, start: int, info: dict) -> None: ...
    def step(self, name: str, step: int, total: int, loss: float, tokens_per_s: float, lr: float) -> None: ...
    def eval(self, name: str, step: int, metrics: dict) -> None: ...
    def stage_end(self, name: str, summary: dict) -> None: ...


class Silent:
    def stage_start(self, *a, **k): pass
    def step(self, *a, **k): pass
    def eval(self, *a, **k): pass
    def stage_end(self, *a, **k): pass


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after`` (tests and tools simulating a kill after a number of steps)."""


class RunExists(RuntimeError):
    pass


def _stage_dir(out: Path, name: str) -> Path:
    return out / "stages" / name


def _is_checkpoint(p: Path) -> bool:
    return (p / "mmlm.yaml").is_file() and (p / "model.safetensors").is_file()


def load_records(sources, where: str, cache: dict) -> list:
    recs = []
    for j, src in enumerate(sources):
        key = json.dumps({"format": src.format, **src.options()}, sort_keys=True)
        if key not in cache:
            cache[key] = read_source(src, where=f"{where}.{j}")
        w = src.weight
        base = cache[key]
        reps = int(w)
        frac = w - reps
        recs.extend(base * reps + base[: int(round(frac * len(base)))])
    return recs


class Trainer:
    def __init__(self, cfg: PipelineConfig, out, reporter: Reporter | None = None, stop_after: int | None = None):
        if cfg.train is None:
            raise ConfigError("the config has no 'train' section", "train")
        self.cfg = cfg
        self.out = Path(out)
        self.reporter = reporter or Silent()
        self.stop_after = stop_after  # simulate a kill after this many optimizer steps in this call
        self.steps_this_call = 0
        self._cache: dict = {}
        self.metrics: dict[str, Any] = {}

    # -------------------------------------------------------------------------------- setup
    def _check_out(self, resume: bool) -> None:
        marker = self.out / "config.yaml"
        if marker.is_file() and not resume:
            raise RunExists(f"{self.out} already holds a run; pass --resume to continue it, or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            marker.write_text(self.cfg.to_yaml())
        mfile = self.out / "metrics.json"
        if resume and mfile.is_file():
            self.metrics = json.loads(mfile.read_text())

    def _initial_model(self):
        from mmlm.model import build

        init = self.out / "init"
        if _is_checkpoint(init):
            return load_checkpoint(init)
        texts = []
        for i, st in enumerate(self.cfg.train.stages):
            for r in load_records(st.data, f"train.stages.{i}.data", self._cache):
                texts.extend(m["content"].replace("<image>", " ") for m in r.messages)
                for per_image in r.meta.values():  # word labels (SEA) must be in the vocabulary too
                    for lab in per_image:
                        for words in (lab.values() if isinstance(lab, dict) else [lab]):
                            texts.extend(words if isinstance(words, list) else [str(words)])
        torch.manual_seed(self.cfg.train.seed)
        model = build(self.cfg, texts=texts)
        save_checkpoint(model, init, full=False)
        return model

    def stage_dataset(self, model, st: StageConfig, idx: int) -> StageDataset:
        recs = load_records(st.data, f"train.stages.{idx}.data", self._cache)
        return StageDataset(recs, model.processor, st.on_bad_sample, name=st.name)

    def eval_dataset(self, model) -> StageDataset | None:
        ev = self.cfg.train.eval
        if ev is None:
            return None
        recs = load_records(ev.data, "train.eval.data", self._cache)
        return StageDataset(recs, model.processor, "skip", name="eval")

    # -------------------------------------------------------------------------------- run
    def run(self, stage: str | None = None, resume: bool = False, model=None):
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        self._check_out(resume)
        stages = self.cfg.train.stages
        if stage is not None:
            self.cfg.stage(stage)  # raises naming the valid stages
        given = model
        model = None
        last = None
        for idx, st in enumerate(stages):
            ck = _stage_dir(self.out, st.name)
            selected = stage is None or st.name == stage
            if _is_checkpoint(ck) and (resume or not selected):
                last = ck
                continue
            if not selected:
                continue
            if model is None:
                if last is not None:
                    model = load_checkpoint(last)
                elif given is not None and not _is_checkpoint(self.out / "init"):
                    model = given
                    save_checkpoint(model, self.out / "init")
                else:
                    model = self._initial_model()
            self.run_stage(model, st, idx, resume)
            last = ck
        if last is not None:
            final = self.out / "final"
            if final.is_symlink() or final.exists():
                final.unlink() if final.is_symlink() else shutil.rmtree(final)
            final.symlink_to(Path("stages") / last.name)
        if model is None and last is not None:
            model = load_checkpoint(last)
        return model

    def _write_metrics(self) -> None:
        tmp = self.out / ".metrics.json.tmp"
        tmp.write_text(json.dumps(self.metrics, indent=2))
        os.replace(tmp, self.out / "metrics.json")

    def run_stage(self, model, st: StageConfig, idx: int, resume: bool) -> dict:
        from accelerate import Accelerator

        seed = self.cfg.train.seed
        data = self.stage_dataset(model, st, idx)
        if len(data) == 0:
            raise ValueError(f"train.stages.{idx} ({st.name}): no usable samples ({data.report()})")
        eval_data = self.eval_dataset(model) if st.eval_every else None
        names = apply_trainable(model, st.trainable, st.frozen)
        model.current_stage = st.name
        model.touched |= {n for n in names if any(n.startswith(p) for p in model.pretrained_prefixes)}
        model.train()
        if st.gradient_checkpointing and hasattr(model.llm, "gradient_checkpointing_enable"):
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        groups = param_groups(model, st.lr, st.lr_groups, st.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=st.lr, betas=(0.9, 0.98), eps=1e-8)
        per_step = st.batch_size * st.grad_accum
        total = st.steps or max(1, math.ceil(st.epochs * len(data) / per_step))
        warmup = st.warmup_steps or int(st.warmup_ratio * total)

        state_dir = self.out / "state" / st.name
        start = 0
        curve = []
        if resume and (state_dir / "state.json").is_file():
            info = load_train_state(state_dir, model, optimizer)
            start = info["step"]
            curve = info.get("curve", [])
        accelerator = Accelerator(mixed_precision=st.precision, cpu=not torch.cuda.is_available())
        device = accelerator.device
        model.to(device)
        pmodel, optimizer = accelerator.prepare(model, optimizer)

        self.reporter.stage_start(st.name, total, start, {"samples": len(data), **data.report(), "trainable": len(names)})
        n = len(data)
        t0 = time.time()
        tokens_seen = 0
        loss_ema = None

        perm_cache: dict[int, torch.Tensor] = {}

        def sample_index(pos: int) -> int:
            epoch, k = divmod(pos, n)
            if epoch not in perm_cache:
                perm_cache.clear()
                g = torch.Generator().manual_seed(seed * 1_000_003 + idx * 10_007 + epoch)
                perm_cache[epoch] = torch.randperm(n, generator=g)
            return int(perm_cache[epoch][k])

        def load_sample(pos: int, skipped: list):
            for attempt in range(n):
                i = sample_index(pos + attempt * 7919)
                try:
                    return data.load(i)
                except SampleError as err:
                    if st.on_bad_sample == "error":
                        raise SampleError(err.detail, err.reason, i, where=f"{st.name}: sample {i} (id {data.records[i].id})") from None
                    skipped.append(err.reason)
            raise ValueError(f"train.stages.{idx} ({st.name}): every sample failed to load")

        def make_batch(micro_index: int) -> dict:
            """The micro-batch at a global position: a pure function of the position, so a resumed
            run, or worker processes, see exactly the batches of an uninterrupted run."""
            skipped: list = []
            base = micro_index * st.batch_size
            batch = model.processor.collate([load_sample(base + j, skipped) for j in range(st.batch_size)])
            batch["_skipped"] = skipped
            return batch

        batches = iter_batches(make_batch, start * st.grad_accum, total * st.grad_accum, st.num_workers)

        last_step_time = time.time()
        completed = start
        try:
            for step in range(start, total):
                factor = lr_factor(step, total, warmup, st.schedule, st.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                torch.manual_seed(seed * 7_919 + idx * 104_729 + step)  # dropout etc. identical on resume
                step_loss = 0.0
                step_tokens = 0
                for micro in range(st.grad_accum):
                    batch = next(batches)
                    for reason in batch.pop("_skipped"):
                        data.skipped[reason] += 1
                    step_tokens += int(batch["attention_mask"].sum())
                    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                    out = pmodel(**batch)
                    loss = out.loss / st.grad_accum
                    accelerator.backward(loss)
                    step_loss += float(loss.detach())
                if st.max_grad_norm:
                    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], st.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                completed = step + 1
                tokens_seen += step_tokens
                now = time.time()
                tps = step_tokens / max(1e-9, now - last_step_time)
                last_step_time = now
                loss_ema = step_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * step_loss
                self.reporter.step(st.name, step + 1, total, loss_ema, tps, optimizer.param_groups[0]["lr"])
                done = step + 1
                if eval_data is not None and (done % st.eval_every == 0 or done == total):
                    ev = self.cfg.train.eval
                    m = evaluate_quick(model, eval_data, ev)
                    curve.append({"step": done, "seconds": round(time.time() - t0, 1), "loss": round(loss_ema, 4),
                                  "vqa_accuracy": m["vqa_accuracy"], "by_type": m["by_type"]})
                    self.reporter.eval(st.name, done, m)
                    model.train()
                self.steps_this_call += 1
                if done < total and (done % st.save_every == 0 or self.stop_after == self.steps_this_call):
                    save_train_state(state_dir, model, optimizer, done, {"stage": st.name, "curve": curve})
                if self.stop_after is not None and self.steps_this_call >= self.stop_after and done < total:
                    raise TrainingInterrupted(f"stopped after {self.steps_this_call} steps (stage {st.name}, step {done})")
        except BaseException as err:
            # an error or Ctrl-C loses nothing: keep the last completed step (a micro-batch in
            # flight is dropped; its gradients were never applied)
            if completed > start and not isinstance(err, TrainingInterrupted) and completed < total:
                save_train_state(state_dir, model, optimizer, completed, {"stage": st.name, "curve": curve})
            raise

        model = accelerator.unwrap_model(pmodel, keep_fp32_wrapper=False)
        model.current_stage = None
        if st.gradient_checkpointing and hasattr(model.llm, "gradient_checkpointing_disable"):
            model.llm.gradient_checkpointing_disable()
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        wall = time.time() - t0
        summary = {
            "steps": total,
            "resumed_from": start,
            "seconds": round(wall, 1),
            "final_loss": round(loss_ema, 4) if loss_ema is not None else None,
            "tokens_per_s": round(tokens_seen / max(wall, 1e-9), 1),
            "data": data.report(),
            "curve": curve,
        }
        save_checkpoint(model, _stage_dir(self.out, st.name), metrics=summary)
        shutil.rmtree(state_dir, ignore_errors=True)
        self.metrics.setdefault("stages", {})[st.name] = summary
        self._write_metrics()
        self.reporter.stage_end(st.name, summary)
        return summary


class _MicroBatches(torch.utils.data.Dataset):
    def __init__(self, fn, start: int, stop: int):
        self.fn, self.start, self.stop = fn, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> dict:
        return self.fn(self.start + j)


def iter_batches(fn, start: int, stop: int, num_workers: int):
    """Micro-batches ``start..stop-1`` in order; with ``num_workers`` they are prepared ahead in
    worker processes (image decoding and tokenisation overlap the model's step)."""
    if num_workers <= 0:
        return (fn(m) for m in range(start, stop))
    loader = torch.utils.data.DataLoader(
        _MicroBatches(fn, start, stop), batch_size=None, shuffle=False, num_workers=num_workers, prefetch_factor=4
    )
    return iter(loader)


def evaluate_quick(model, data: StageDataset, ev) -> dict:
    from mmlm.evaluate import evaluate

    return evaluate(model, data, max_questions=ev.max_questions, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens)


def train(cfg: PipelineConfig, out, stage: str | None = None, resume: bool = False, reporter: Reporter | None = None,
          stop_after: int | None = None, model=None):
    """Run the config's stages into ``out``; returns the trained model. ``model``: start from this
    already built model instead of building one from the config (a new run only)."""
    return Trainer(cfg, out, reporter, stop_after).run(stage=stage, resume=resume, model=model)
