"""The run folder (``--out``): one process trains in it at a time, it holds one run's config, and a
resume puts back whatever a kill interrupted.

Layout::

    OUT/config.yaml          the resolved config of the run
    OUT/.lock                held (flock) by the process training in the folder; names it
    OUT/init/                the model as built before any stage (so a resumed run starts identically)
    OUT/state/STAGE/         the last saved step of an unfinished stage (weights, optimizer, step)
    OUT/stages/STAGE/        each finished stage's checkpoint
    OUT/final -> stages/LAST
    OUT/metrics.json         per-stage summaries, evaluation and accuracy curve
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from mmlm.checkpoint import migrate_format1
from mmlm.config import PipelineConfig, parse_config
from mmlm.errors import RunExists
from mmlm.storage import recover_folder

log = logging.getLogger(__name__)

# keys a resumed run may change: they do not change what is trained
HARMLESS = (
    "train.threads",
    "train.log_every",
    "train.stages.*.num_workers",
    "train.stages.*.eval_every",
    "train.stages.*.save_every",
    "train.eval.max_questions",
    "train.eval.batch_size",
)
_ABSENT = object()


def _flatten(obj, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists -> {"a.b.0.c": value}; list items by index."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    if not out:
        out[prefix] = obj  # an empty dict or list is a value too
    return out


def is_checkpoint(p: Path) -> bool:
    return (p / "mmlm.yaml").is_file() and (p / "model.safetensors").is_file()


class RunFolder:
    def __init__(self, out):
        self.out = Path(out)
        self._lock_file = None

    @property
    def init(self) -> Path:
        return self.out / "init"

    def stage(self, name: str) -> Path:
        return self.out / "stages" / name

    def state(self, name: str) -> Path:
        return self.out / "state" / name

    def lock(self) -> None:
        """An exclusive lock on ``OUT/.lock`` for the life of this process's run (released by the OS
        if the process dies); a second run into the same folder is refused naming the holder."""
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.out / ".lock", "a+")  # held open until the run ends
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunExists(
                f"{self.out} is in use by {holder}; wait for it to finish or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)})\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the lock
            self._lock_file = None

    def open(self, cfg: PipelineConfig, continuing: bool) -> dict[str, Any]:
        """Start a run here, or continue the one the folder holds (``continuing``: after a kill,
        interrupted writes are finished or undone and the config must match). Returns the metrics
        recorded so far."""
        marker = self.out / "config.yaml"
        if marker.is_file() and not continuing:
            raise RunExists(f"{self.out} already holds a run; pass --resume to continue it, or choose another --out")
        if not marker.is_file():
            marker.write_text(cfg.to_yaml())
        if not continuing:
            return {}
        for folder in (self.out, self.out / "stages", self.out / "state"):
            recover_folder(folder)
        self._compare_config(cfg, marker)
        mfile = self.out / "metrics.json"
        return json.loads(mfile.read_text()) if mfile.is_file() else {}

    def _compare_config(self, cfg: PipelineConfig, marker: Path) -> None:
        """A config that differs from the run's is refused with the differing keys, except the keys
        that do not change what is trained (``HARMLESS``), which are taken and recorded in
        ``config.yaml``."""
        raw, _, _ = migrate_format1(yaml.safe_load(marker.read_text()))
        before, now = _flatten(parse_config(raw).to_dict()), _flatten(cfg.to_dict())
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k, _ABSENT) != now.get(k, _ABSENT))
        harmful = [k for k in changed if not any(fnmatchcase(k, p) for p in HARMLESS)]
        if harmful:
            shown = "; ".join(f"{k}: {before.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in harmful[:8])
            raise RunExists(
                f"{self.out} holds a run with another config ({len(harmful)} key(s) differ: {shown}); "
                "resume with the run's own config, or start a new run in another --out"
            )
        if changed:
            marker.write_text(cfg.to_yaml())
            log.warning("resuming %s with new values for %s", self.out, ", ".join(changed))

    def point_final(self, stage: str) -> None:
        """``OUT/final -> stages/STAGE``, swapped atomically."""
        final, link = self.out / "final", self.out / ".final.link"
        if final.exists() and not final.is_symlink():
            shutil.rmtree(final)
        link.unlink(missing_ok=True)
        link.symlink_to(Path("stages") / stage)
        os.replace(link, final)

    def write_metrics(self, metrics: dict) -> None:
        tmp = self.out / ".metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, self.out / "metrics.json")
