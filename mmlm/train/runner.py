"""Run the stages a pipeline config declares, in order, on accelerate, into a run folder
(``run_folder.py`` has its layout, lock and resume checks).

A stage is: its batches by position (``batches.py``), the objectives it lists (``mmlm/objectives``),
one optimizer step after another (``_optimizer_step``), evaluation every ``eval_every`` steps, and a
checkpoint at the end (``_finish_stage``). Every seed comes from ``seeds.derive_seed``.

Under ``accelerate launch`` or ``torchrun`` several processes run this together: each takes its
share of every global micro-batch, gradients are averaged once per step, evaluation is split and
gathered, and only the main process writes the run folder (``processes.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mmlm.checkpoint import load, load_as
from mmlm.config import PipelineConfig, StageConfig
from mmlm.data.dataset import StageDataset
from mmlm.data.pairs import batch_tokens
from mmlm.data.sources import read_source
from mmlm.errors import ConfigError, DataError, TrainingInterrupted, TrainingStopped
from mmlm.evaluate import evaluate, image_use
from mmlm.model import TEXT_INPUTS, build
from mmlm.objectives import Objective, StepInfo, build_objectives
from mmlm.objectives.lm import supervised_cells
from mmlm.registry import OBJECTIVES
from mmlm.train.batches import StageBatches, iter_batches
from mmlm.train.freeze import apply_trainable, param_groups
from mmlm.train.lora import attach, restrict_to_adapters
from mmlm.train.processes import Processes
from mmlm.train.progress import LossWindow, is_log_step
from mmlm.train.run_folder import RunFolder, is_checkpoint
from mmlm.train.schedule import lr_factor
from mmlm.train.seeds import derive_seed
from mmlm.train.state import load_train_state, save_train_state

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def stage_start(self, name: str, total: int, start: int, info: dict) -> None: ...
    def step(self, name: str, step: int, total: int, loss: float, tokens_per_s: float, lr: float) -> None: ...
    def eval(self, name: str, step: int, metrics: dict) -> None: ...
    def stage_end(self, name: str, summary: dict) -> None: ...


class Silent:
    def stage_start(self, *a, **k):
        pass

    def step(self, *a, **k):
        pass

    def eval(self, *a, **k):
        pass

    def stage_end(self, *a, **k):
        pass


def load_records(sources, where: str, cache: dict) -> list:
    recs = []
    for j, src in enumerate(sources):
        key = json.dumps({"format": src.format, **src.options()}, sort_keys=True)
        if key not in cache:
            cache[key] = read_source(src, where=f"{where}.{j}")
        base = cache[key]
        reps = int(src.weight)
        recs.extend(base * reps + base[: int(round((src.weight - reps) * len(base)))])
    return recs


@dataclass
class StageRun:
    """Everything one stage's loop works with."""

    st: StageConfig
    index: int  # the stage's position in train.stages
    where: str
    model: Any
    pmodel: Any  # the model as accelerate prepared it
    accelerator: Any
    optimizer: torch.optim.Optimizer
    objectives: list[Objective]
    data: StageDataset
    batches: Any  # iterator of micro-batches from the start position
    eval_data: StageDataset | None
    total: int
    warmup: int
    start: int
    state_dir: Path
    trainable: int
    curve: list = field(default_factory=list)
    loss_curve: list = field(default_factory=list)  # {step, loss} at every log step
    completed: int = 0
    tokens_seen: int = 0
    log_every: int = 50
    window: LossWindow = field(default_factory=LossWindow)  # step losses since the last log step
    t0: float = field(default_factory=time.time)
    last_step_time: float = field(default_factory=time.time)


class Trainer:
    def __init__(self, cfg: PipelineConfig, out, reporter: Reporter | None = None, stop_after: int | None = None):
        if cfg.train is None:
            raise ConfigError("the config has no 'train' section", "train")
        self.cfg = cfg
        self.seed = cfg.train.seed
        self.folder = RunFolder(out)
        self.reporter = reporter or Silent()
        self.stop_after = stop_after  # simulate a kill after this many optimizer steps in this call
        self.steps_this_call = 0
        self._cache: dict = {}
        self.metrics: dict[str, Any] = {}
        self.procs = Processes()

    # -------------------------------------------------------------------------------- setup
    def _check_inputs(self, stage: str | None) -> None:
        """What can be checked before anything is written to ``--out``: the stage asked for and every
        data source (files exist and parse)."""
        if stage is not None:
            self.cfg.stage(stage)  # raises naming the valid stages
        for i, st in enumerate(self.cfg.train.stages):
            load_records(st.data, f"train.stages.{i}.data", self._cache)
        if self.cfg.train.eval is not None:
            load_records(self.cfg.train.eval.data, "train.eval.data", self._cache)

    def tokenizer_texts(self) -> list[str]:
        """What a from-scratch tokenizer must cover: every text the stages' records carry and every
        word their objectives feed the LLM."""
        texts = []
        for i, st in enumerate(self.cfg.train.stages):
            for r in load_records(st.data, f"train.stages.{i}.data", self._cache):
                texts.extend(r.texts())
            for j, obj in enumerate(st.objectives):
                texts.extend(obj.parsed(OBJECTIVES, f"train.stages.{i}.objectives.{j}").texts())
        return texts

    def _initial_model(self):
        init = self.folder.init
        if is_checkpoint(init):
            return load(init)

        def build_and_save():
            torch.manual_seed(derive_seed(self.seed, 0, 0, "init"))
            if self.cfg.train.init_from:
                model = load_as(self.cfg.train.init_from, self.cfg)
            else:
                model = build(self.cfg, texts=self.tokenizer_texts())
            model.save(init)
            return model

        model = self.procs.on_main(build_and_save, "built the initial model")
        return model if model is not None else load(init)  # the other processes read what it saved

    def _dataset(self, model, sources, where: str, policy: str, name: str) -> StageDataset:
        recs = load_records(sources, where, self._cache)
        return StageDataset(
            recs,
            model.processor,
            policy,
            name=name,
            embedding=model.config.model.embedding,
            cache=True,
            workers=max(1, (os.cpu_count() or 1) // self.procs.count),  # the cores this process may use
        )

    # -------------------------------------------------------------------------------- run
    def run(self, stage: str | None = None, resume: bool = False, model=None):
        if not self.procs.is_main:
            self.reporter = Silent()
        self._check_inputs(stage)
        self.procs.on_main(self.folder.lock, "locked the run folder")
        threads = torch.get_num_threads()
        try:
            if self.cfg.train.threads:  # for this run only: the caller's setting comes back after it
                torch.set_num_threads(self.cfg.train.threads)
            # --stage continues the run the folder holds (the same checks as --resume), running that stage
            self.metrics = self.procs.on_main(
                lambda: self.folder.open(self.cfg, continuing=resume or stage is not None), "opened the run folder"
            )
            return self._run_stages(stage, resume, model)
        finally:
            torch.set_num_threads(threads)
            self.folder.unlock()

    def _run_stages(self, stage: str | None, resume: bool, model):
        given, model, last = model, None, None
        for idx, st in enumerate(self.cfg.train.stages):
            ck = self.folder.stage(st.name)
            selected = stage is None or st.name == stage
            if is_checkpoint(ck) and (resume or not selected):
                last = ck
                continue
            if not selected:
                continue
            if model is None:
                if last is not None:
                    model = load(last)
                elif given is not None and not is_checkpoint(self.folder.init):
                    model = given
                    self.procs.on_main(lambda m=given: m.save(self.folder.init), "saved the initial model")
                else:
                    model = self._initial_model()
            self.run_stage(model, st, idx, resume)
            last = ck
        if last is not None:
            self.procs.on_main(lambda: self.folder.point_final(last.name), "pointed final at the last stage")
        if model is None and last is not None:
            model = load(last)
        return model

    def run_stage(self, model, st: StageConfig, idx: int, resume: bool) -> dict:
        run = self._start_stage(model, st, idx, resume)
        try:
            for step in range(run.start, run.total):
                self._optimizer_step(run, step)
                self._after_step(run, step + 1)
        except BaseException as err:
            # an error, Ctrl-C or SIGTERM loses nothing: keep the last completed step (a micro-batch
            # in flight is dropped; its gradients were never applied)
            if run.start < run.completed < run.total and not isinstance(err, TrainingInterrupted):
                if self.procs.is_main:  # no collective here: another process may be gone
                    self._write_state(run, run.data.failed)
            if isinstance(err, KeyboardInterrupt) and not isinstance(err, TrainingStopped):
                saved = run.completed if run.completed > run.start else run.start
                where = f"state saved in {run.state_dir} at step {saved}" if saved else "no step was completed"
                raise TrainingStopped(
                    f"stage {st.name} stopped at step {run.completed} of {run.total}; {where}; "
                    "continue with the same command and --resume"
                ) from err
            raise
        finally:
            # the model leaves the stage as it came: without accelerate's autocast wrapper on its
            # forward (a bf16 stage must not make the next stage, or evaluation after training, bf16)
            run.accelerator.unwrap_model(run.pmodel, keep_fp32_wrapper=False)
            # and unmarked: accelerate skips a model it has prepared before, so the next stage's
            # precision (autocast) and wrapping would silently not apply
            run.model.__dict__.pop("_is_accelerate_prepared", None)
        return self._finish_stage(run)

    # -------------------------------------------------------------------------------- stage pieces
    def _start_stage(self, model, st: StageConfig, idx: int, resume: bool) -> StageRun:
        from accelerate import Accelerator

        where = f"train.stages.{idx}"
        data = self._dataset(model, st.data, f"{where}.data", st.on_bad_sample, st.name)
        if len(data) == 0:
            raise DataError(f"{where}.data ({st.name}): no usable samples ({data.report()})")
        eval_data = None
        if st.eval_every:
            eval_data = self._dataset(model, self.cfg.train.eval.data, "train.eval.data", "skip", "eval")
        objectives = build_objectives(st, model, where)
        names = select_trainable(model, st, where)
        model.train()
        if st.gradient_checkpointing and hasattr(model.llm, "gradient_checkpointing_enable"):
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        groups = param_groups(model, st.lr, st.lr_groups, st.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=st.lr, betas=(0.9, 0.98), eps=1e-8)
        total = st.steps or max(1, math.ceil(st.epochs * len(data) / (st.batch_size * st.grad_accum)))
        state_dir = self.folder.state(st.name)
        start, curve, loss_curve, window = 0, [], [], LossWindow()
        if resume and (state_dir / "state.json").is_file():
            info = load_train_state(state_dir, model, optimizer)
            start, curve, loss_curve = info["step"], info.get("curve", []), info.get("loss_curve", [])
            window.restore(info.get("loss_window", {}))
            data.failed.update({int(i): reason for i, reason in info.get("failed", {}).items()})
        accelerator = Accelerator(mixed_precision=stage_precision(st.precision), cpu=not torch.cuda.is_available())
        model.to(accelerator.device)
        pmodel, optimizer = accelerator.prepare(model, optimizer)
        share = self.procs.share(st.batch_size, where)
        pack = packing_budget(model, st, objectives, where)
        make_batch = StageBatches(data, st.batch_size, self.seed, st.name, idx, where, st.on_bad_sample, share, pack)
        batches = iter_batches(make_batch, start * st.grad_accum, total * st.grad_accum, st.num_workers)
        self.reporter.stage_start(
            st.name,
            total,
            start,
            {
                "samples": len(data),
                **data.report(),
                "trainable": len(names),
                "log_every": self.cfg.train.log_every,
                "processes": self.procs.count,
            },
        )
        return StageRun(
            st=st,
            index=idx,
            where=where,
            model=model,
            pmodel=pmodel,
            accelerator=accelerator,
            optimizer=optimizer,
            objectives=objectives,
            data=data,
            batches=batches,
            eval_data=eval_data,
            total=total,
            warmup=st.warmup_steps or int(st.warmup_ratio * total),
            start=start,
            state_dir=state_dir,
            trainable=len(names),
            curve=curve,
            loss_curve=loss_curve,
            completed=start,
            log_every=self.cfg.train.log_every,
            window=window,
        )

    def _losses(self, run: StageRun, batch: dict) -> dict[str, torch.Tensor]:
        """The micro-batch's weighted losses by name (each objective's own, times its weight)."""
        position = batch.pop("_position")
        info = StepInfo(
            run.st.name,
            position,
            lambda purpose: derive_seed(self.seed, run.index, position, purpose),
            self.procs.count,
            self.procs.global_mean,
            self.procs.gather,
        )
        hidden = any(o.needs_hidden_states for o in run.objectives)
        out = None  # objectives on pairs data run the model themselves (objectives/_base.py)
        if any(o.data_kind == "conversations" for o in run.objectives):
            if not reads_llm(run.objectives):  # SEA alone: the encoder and connector are all it needs
                media = {k: v for k, v in run.model.inputs(batch).items() if k not in TEXT_INPUTS}
                with run.accelerator.autocast():
                    out = run.model.media_only(**media)
            else:
                keep = logits_to_keep(run.model, run.objectives, batch)
                extra = {} if keep is None else {"logits_to_keep": keep}
                with self.procs.no_sync(run.accelerator, run.pmodel):
                    out = run.pmodel(**run.model.inputs(batch), output_hidden_states=hidden, **extra)
        losses: dict[str, torch.Tensor] = {}
        with run.accelerator.autocast():
            for obj in run.objectives:
                if obj.opts.weight == 0:
                    continue
                if obj.handles_backward:  # it back-propagates itself (GradCache); its losses come back detached
                    scale = obj.opts.weight / run.st.grad_accum
                    got = obj.backward_step(batch, info, scale, run.accelerator.backward)
                else:
                    got = obj(out, batch, info)
                for name, value in got.items():
                    losses[name] = obj.opts.weight * value
        if not losses:
            raise ValueError(f"{run.where} ({run.st.name}): no objective gave a loss for micro-batch {position}")
        return losses

    def _optimizer_step(self, run: StageRun, step: int) -> None:
        st, device = run.st, run.accelerator.device
        factor = lr_factor(step, run.total, run.warmup, st.schedule, st.min_lr_ratio)
        for g in run.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        torch.manual_seed(derive_seed(self.seed, run.index, step, "step"))  # dropout etc. identical on resume
        step_tokens, parts = 0, {}
        for _ in range(st.grad_accum):
            batch = next(run.batches)
            run.data.failed.update(dict(batch.pop("_skipped")))
            step_tokens += batch_tokens(batch)
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            losses = self._losses(run, batch)
            total = sum(losses.values()) / st.grad_accum
            if total.requires_grad:  # a text-only batch while only the connector trains has no gradient
                run.accelerator.backward(total)
            for name, value in losses.items():  # summed on the device: one host transfer per step
                parts[name] = parts.get(name, 0.0) + value.detach() / st.grad_accum
        params = [p for p in run.model.parameters() if p.requires_grad]
        self.procs.sync_gradients(params)
        if st.max_grad_norm:
            run.accelerator.clip_grad_norm_(params, st.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        parts = dict(zip(parts, torch.stack(list(parts.values())).tolist(), strict=True)) if parts else {}
        if self.procs.several:  # the global micro-batches' losses and tokens
            everyone = self.procs.gather((parts, step_tokens))
            parts = {}
            for got, _ in everyone:
                for k, v in got.items():
                    parts[k] = parts.get(k, 0.0) + v / self.procs.count
            step_tokens = sum(tokens for _, tokens in everyone)
        run.window.add(parts)
        if is_log_step(step + 1, run.total, run.log_every):
            run.window.close()
            run.loss_curve.append({"step": step + 1, "loss": run.window.last})
        run.completed = step + 1
        run.tokens_seen += step_tokens
        now = time.time()
        tps = step_tokens / max(1e-9, now - run.last_step_time)
        run.last_step_time = now
        loss = run.window.last if run.window.last is not None else float("nan")  # the last interval's mean
        self.reporter.step(st.name, step + 1, run.total, loss, tps, run.optimizer.param_groups[0]["lr"])

    def _after_step(self, run: StageRun, done: int) -> None:
        """Evaluate, save the state, or stop (``stop_after``: a simulated kill, saving nothing) after step ``done``."""
        st = run.st
        if run.eval_data is not None and (done % st.eval_every == 0 or done == run.total):
            m = evaluate_quick(run.model, run.eval_data, self.cfg.train.eval, self.procs)
            run.curve.append(
                {
                    "step": done,
                    "seconds": round(time.time() - run.t0, 1),
                    "loss": _rounded(run.window.last),
                    "vqa_accuracy": m["vqa_accuracy"],
                    "by_type": m["by_type"],
                    **image_use_point(m.get("image_use")),
                }
            )
            self.reporter.eval(st.name, done, m)
            run.model.train()
        self.steps_this_call += 1
        if done < run.total and done % st.save_every == 0:
            self._save_state(run)
        if self.stop_after is not None and self.steps_this_call >= self.stop_after and done < run.total:
            raise TrainingInterrupted(f"stopped after {self.steps_this_call} steps (stage {st.name}, step {done})")

    def _failed(self, run: StageRun) -> dict:
        """The samples every process skipped so far (a collective on several processes)."""
        failed = {}
        for got in self.procs.gather(run.data.failed):
            failed.update(got)
        return failed

    def _save_state(self, run: StageRun) -> None:
        failed = self._failed(run)
        self.procs.on_main(lambda: self._write_state(run, failed), f"saved the state at step {run.completed}")

    def _write_state(self, run: StageRun, failed: dict) -> None:
        info = {
            "stage": run.st.name,
            "curve": run.curve,
            "loss_curve": run.loss_curve,
            "failed": failed,
            "loss_window": run.window.state(),
        }
        save_train_state(run.state_dir, run.model, run.optimizer, run.completed, info)

    def _finish_stage(self, run: StageRun) -> dict:
        st = run.st
        model = run.accelerator.unwrap_model(run.pmodel, keep_fp32_wrapper=False)
        if st.gradient_checkpointing and hasattr(model.llm, "gradient_checkpointing_disable"):
            model.llm.gradient_checkpointing_disable()
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        wall = time.time() - run.t0
        run.data.failed = self._failed(run)
        summary = {
            "steps": run.total,
            "resumed_from": run.start,
            "seconds": round(wall, 1),
            "final_loss": _rounded(run.window.last),  # the mean over the last log interval
            "losses": {k: round(v, 4) for k, v in run.window.last_parts.items()},
            "tokens_per_s": round(run.tokens_seen / max(wall, 1e-9), 1),
            "processes": self.procs.count,
            "peak_memory_mb": max(self.procs.gather(peak_memory_mb(run.accelerator.device))),
            "data": run.data.report(),
            "curve": run.curve,
            "loss_curve": run.loss_curve,  # the mean loss of each log interval
        }

        def write():
            model.save(self.folder.stage(st.name), metrics=summary)
            shutil.rmtree(run.state_dir, ignore_errors=True)
            self.metrics.setdefault("stages", {})[st.name] = summary
            self.folder.write_metrics(self.metrics)

        self.procs.on_main(write, f"saved stage {st.name}")
        self.reporter.stage_end(st.name, summary)
        return summary


def stage_precision(precision: str) -> str:
    """``precision`` for a stage's ``Accelerator``. accelerate keeps one mixed-precision setting per
    process (``AcceleratorState``) and refuses another; stages choose their own, so the state is
    renewed when a stage changes it (the process group, in ``PartialState``, stays)."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state
    if held and str(held.get("_mixed_precision", precision)) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return precision


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def evaluate_quick(model, data: StageDataset, ev, procs: Processes | None = None) -> dict:
    """The accuracy on ``train.eval`` and the image-use check (``mmlm.evaluate.image_use``) beside it."""
    several = procs is not None and procs.several
    kw = {
        "max_questions": ev.max_questions,
        "batch_size": ev.batch_size,
        "max_new_tokens": ev.max_new_tokens,
        "share": (procs.index, procs.count) if several else None,
        "gather": procs.gather if several else None,
    }
    m = evaluate(model, data, **kw)
    use = image_use(model, data, **kw)
    if use["n_eval"]:
        m["image_use"] = use
    return m


def image_use_point(use: dict | None) -> dict:
    """The image-use figures of a curve point (none when the evaluation data has no media)."""
    if not use:
        return {}
    return {
        "heldout_loss": round(use["loss"], 4),
        "shuffled_loss": round(use["loss_shuffled"], 4),
        "shuffled_accuracy": use["accuracy_shuffled"],
    }


def reads_llm(objectives: list[Objective]) -> bool:
    """Whether any objective of a stage on conversations reads the LLM's output (logits or hidden
    states); when none does, the trainer runs the encoders and connectors only."""
    active = [o for o in objectives if o.data_kind == "conversations" and o.opts.weight != 0]
    return not active or any(o.logits != "none" or o.needs_hidden_states for o in active)


def logits_to_keep(model, objectives: list[Objective], batch: dict) -> torch.Tensor | None:
    """The positions whose logits the stage's objectives read, when that is not all of them: the
    LM head (a vocabulary-wide matrix product, and the largest activation of a big-vocabulary LLM)
    then runs on the supervised positions only. None: compute every logit."""
    kinds = {o.logits for o in objectives if o.data_kind == "conversations" and o.opts.weight != 0}
    if "all" in kinds or not model.llm_keeps_logits or any(r.prunes for r in model.reducers.values()):
        return None
    if "supervised" in kinds:
        return supervised_cells(batch["labels"])  # exact cells, or their positions where the LLM needs that
    return torch.zeros(0, dtype=torch.long)  # no objective reads a logit


def packing_budget(model, st: StageConfig, objectives: list[Objective], where: str) -> int | None:
    """The token budget of a packed row for stage ``st``, or None when it does not pack; what packing
    cannot serve is refused naming ``{where}.packing``."""
    if not st.packing:
        if st.pack_tokens is not None:
            raise ConfigError(
                "pack_tokens is the budget of packed rows: set packing: true, or remove it", f"{where}.pack_tokens"
            )
        return None
    if any(o.data_kind != "conversations" for o in objectives):
        raise ConfigError("packing applies to conversations; this stage trains on pairs", f"{where}.packing")
    pruning = [name for name, red in model.reducers.items() if red.prunes]
    if pruning:
        raise ConfigError(
            f"pruning inside the LLM (model.token_reduction.{pruning[0]}) scores tokens per row; "
            "it does not run on packed rows",
            f"{where}.packing",
        )
    limit = model.processor.config.max_length
    budget = st.pack_tokens or limit
    if budget < limit:
        raise ConfigError(
            f"pack_tokens {budget} is below processor.max_length {limit}: the longest samples would not fit a row",
            f"{where}.pack_tokens",
        )
    return budget


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: allocated on a CUDA device, resident (RSS) otherwise."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def select_trainable(model, st: StageConfig, where: str) -> list[str]:
    """Set ``requires_grad`` for stage ``st``: its LoRA adapters injected (mmlm/train/lora.py), then its
    ``trainable``/``frozen`` patterns, then the adapted parts restricted to their adapters. Returns
    the names that train."""
    for part, opts in st.lora.items():  # adapters first: trainable patterns may name them
        attach(model, part, opts, f"{where}.lora.{part}")
    names = apply_trainable(model, st.trainable, st.frozen, where=f"{where}.trainable")
    if model.lora:
        names = restrict_to_adapters(model, st.lora)
    return names


def train(
    cfg: PipelineConfig,
    out,
    stage: str | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
    stop_after: int | None = None,
    model=None,
):
    """Run the config's stages into ``out``; returns the trained model. ``model``: start from this
    already built model instead of building one from the config (a new run only)."""
    return Trainer(cfg, out, reporter, stop_after).run(stage=stage, resume=resume, model=model)
