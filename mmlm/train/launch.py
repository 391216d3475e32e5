"""``mmlm train --processes N``: the same command under ``accelerate launch`` on this machine, N
processes with DDP (NCCL on GPUs, gloo on CPUs), on a free port so that two runs can share a machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    processes: int,
    config: Path,
    out: Path | None,
    stage: str | None,
    resume: bool,
    sets: list[str],
    debug: bool = False,
) -> list[str]:
    """The ``accelerate launch`` command line that runs ``mmlm train`` with these options on ``processes``
    processes. ``--multi_gpu`` is accelerate's multi-process launcher (torchrun); on a machine without
    GPUs it starts CPU processes that talk over gloo."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",  # each stage's precision comes from the config
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        str(threads),
        "-m",
        "mmlm.cli",
        *(["--debug"] if debug else []),  # tracebacks from every process
        "train",
        str(config),
    ]
    if out is not None:
        cmd += ["--out", str(out)]
    if stage is not None:
        cmd += ["--stage", stage]
    if resume:
        cmd.append("--resume")
    for s in sets:
        cmd += ["--set", s]
    return cmd


def launch(
    processes: int,
    config: Path,
    out: Path | None,
    stage: str | None,
    resume: bool,
    sets: list[str],
    debug: bool = False,
) -> int:
    """Run the launch command and return its exit status."""
    return subprocess.call(launch_command(processes, config, out, stage, resume, sets, debug))
