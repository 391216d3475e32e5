"""Progress reporting for training runs: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ConsoleReporter:
    def __init__(self, console: Console | None = None, every: int = 50):
        self.console = console or Console(stderr=False)
        self.live = self.console.is_terminal
        self.every = every
        self.progress = None
        self.task = None
        self.t0 = time.time()

    def stage_start(self, name, total, start, info):
        self.t0 = time.time()
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
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[tps]:.0f} tok/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(name, total=total, completed=start, loss=float("nan"), tps=0.0)

    def step(self, name, step, total, loss, tps, lr):
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=loss, tps=tps)
        elif step % self.every == 0 or step == total:
            self.console.print(
                f"  {name} step {step}/{total}  loss {loss:.4f}  {tps:.0f} tok/s  lr {lr:.2e}  "
                f"{time.time() - self.t0:.0f}s"
            )

    def eval(self, name, step, m):
        by = "  ".join(f"{k} {v:.2f}" for k, v in m["by_type"].items())
        msg = f"  eval @ {name} step {step}: accuracy {m['vqa_accuracy']:.3f} on {m['n_eval']}  ({by})"
        (self.progress.console if self.progress else self.console).print(msg)

    def stage_end(self, name, summary):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.console.print(
            f"  {name} done in {summary['seconds']}s, final loss {summary['final_loss']} "
            f"({', '.join(f'{k} {v}' for k, v in summary.get('losses', {}).items())}), {summary['tokens_per_s']} tok/s"
        )
        sys.stdout.flush()
