"""Progress reporting for training runs: a rich progress bar on a terminal, plain lines otherwise.

The loss reported is the mean over the last log interval (``train.log_every`` steps, counted in the
stage's own step so a resumed run logs at the same steps and the same numbers, see ``LossWindow``).
"""

from __future__ import annotations

import math
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def is_log_step(step: int, total: int, every: int) -> bool:
    """Whether the loss is logged after stage step ``step`` (1-based): every ``every`` steps and the last."""
    return step % every == 0 or step == total


class LossWindow:
    """Step losses summed since the last log step; ``close`` turns them into the interval's means.

    ``state``/``restore`` carry it through a saved train state, so a resumed stage reports exactly the
    numbers of an uninterrupted one."""

    KEYS = ("total", "parts", "count", "last", "last_parts")

    def __init__(self):
        self.total, self.parts, self.count = 0.0, {}, 0
        self.last: float | None = None  # the last logged interval's mean loss
        self.last_parts: dict[str, float] = {}  # and per objective loss

    def add(self, parts: dict[str, float]) -> None:
        self.total += sum(parts.values())
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value
        self.count += 1

    def close(self) -> None:
        if self.count:
            self.last = self.total / self.count
            self.last_parts = {k: v / self.count for k, v in self.parts.items()}
        self.total, self.parts, self.count = 0.0, {}, 0

    def state(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}

    def restore(self, state: dict) -> None:
        for k in self.KEYS:
            if k in state:
                setattr(self, k, state[k])


class ConsoleReporter:
    def __init__(self, console: Console | None = None, every: int | None = None):
        self.console = console or Console(stderr=False)
        self.live = self.console.is_terminal
        self.given_every = every  # None: the run's train.log_every
        self.every = every or 50
        self.progress = None
        self.task = None
        self.t0 = time.time()

    def stage_start(self, name, total, start, info):
        self.t0 = time.time()
        self.every = self.given_every or info.get("log_every") or 50
        used, skipped = info.get("used"), info.get("skipped", 0)
        extra = f", skipped {skipped} {info.get('skipped_by_reason')}" if skipped else ""
        self.console.print(
            f"[bold]stage {name}[/]: {total} steps, {used} samples{extra}, {info.get('trainable')} trainable tensors"
            + (f", resuming at step {start}" if start else "")
        )
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]:.0f} tok/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(name, total=total, completed=start, loss="-", tps=0.0)

    def step(self, name, step, total, loss, tps, lr):
        """``loss``: the mean over the last log interval (nan before the first one closes)."""
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss="-" if math.isnan(loss) else f"{loss:.4f}", tps=tps)
        elif is_log_step(step, total, self.every):
            self.console.print(
                f"  {name} step {step}/{total}  loss {loss:.4f}  {tps:.0f} tok/s  lr {lr:.2e}  "
                f"{time.time() - self.t0:.0f}s"
            )

    def eval(self, name, step, m):
        by = "  ".join(f"{k} {v:.2f}" for k, v in m["by_type"].items())
        msg = f"  eval @ {name} step {step}: accuracy {m['vqa_accuracy']:.3f} on {m['n_eval']}  ({by})"
        use = m.get("image_use")
        if use:
            msg += (
                f"\n    image use: answer loss {use['loss']:.3f} with its image, {use['loss_shuffled']:.3f} with "
                f"another sample's; accuracy with another's {use['accuracy_shuffled']:.3f}"
            )
        (self.progress.console if self.progress else self.console).print(msg)

    def stage_end(self, name, summary):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.console.print(
            f"  {name} done in {summary['seconds']}s, final loss {summary['final_loss']} "
            f"({', '.join(f'{k} {v}' for k, v in summary.get('losses', {}).items())}), {summary['tokens_per_s']} tok/s"
            + (f", peak memory {summary['peak_memory_mb']:.0f} MiB" if summary.get("peak_memory_mb") else "")
            + (f" per process ({summary['processes']} processes)" if summary.get("processes", 1) > 1 else "")
        )
        sys.stdout.flush()
