"""Training on several processes: ``accelerate launch`` (or ``torchrun``, or ``mmlm train --processes
N``) starts one ``mmlm train`` per process; accelerate's state says which one this is and opens the
process group (NCCL on GPUs, gloo on CPUs).

What every process does the same: read the config and data, step through the same global
micro-batch positions, and run the same collectives in the same order. What differs:

- **its share of every micro-batch**: the stage's ``batch_size`` is the global micro-batch; process
  ``r`` of ``N`` takes positions ``r * b/N .. (r+1) * b/N - 1`` of it (``share``), so N processes see
  exactly the samples of one process with the same batch size, and a resume with another N
  continues at the same global position;
- **the loss normaliser**: an objective that averages over items (supervised tokens, visual tokens)
  divides its local sum by the global count over N (``global_mean``), so the mean of the processes'
  losses, and of their gradients, is the single-process batch's;
- **gradients** are averaged once per optimizer step (``sync_gradients``), after every micro-batch of
  the accumulation: one all-reduce per bucket, whichever way an objective reached the parameters
  (the DDP forward, an embedding table, ``model.pool`` for pairs) and with zeros from a process
  whose share gave a parameter no gradient (a text-only share while the connector trains). The
  model is still prepared by accelerate (its DDP wrapper broadcasts the first process's weights);
  its forwards run under ``no_sync`` so DDP's own reducer never waits for a backward that an
  objective does not route through it;
- **writing**: only the main process locks and writes the run folder (checkpoints, state, metrics,
  progress); the others wait at a barrier and then read what it wrote.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from mmlm.errors import ConfigError

_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def share_of(batch_size: int, index: int, count: int, where: str) -> tuple[int, int]:
    """(first position, count) of process ``index``'s share of a global micro-batch of ``batch_size``
    among ``count`` processes; ``where`` is the stage's key path, named when it does not divide."""
    if batch_size % count:
        raise ConfigError(
            f"batch_size {batch_size} is the global micro-batch and must divide evenly among {count} "
            "processes (each takes an equal share)",
            f"{where}.batch_size",
        )
    size = batch_size // count
    return index * size, size


class Processes:
    """This process's place among the run's processes."""

    def __init__(self):
        from accelerate import PartialState

        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.index = self.state.process_index
        self.count = self.state.num_processes
        self.is_main = self.state.is_main_process
        self.device = self.state.device
        if self.count > 1 and self.state.distributed_type.name not in ("MULTI_CPU", "MULTI_GPU"):
            raise ConfigError(
                f"{self.count} processes under accelerate's {self.state.distributed_type.name}: mmlm trains several "
                "processes with DDP only (configs/accelerate/ddp.yaml); FSDP and DeepSpeed are not supported yet",
                "train",
            )

    @property
    def several(self) -> bool:
        return self.count > 1

    def barrier(self) -> None:
        if self.several:
            self.state.wait_for_everyone()

    def on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on the main process only; the others wait for it. When it fails, the main process
        raises its error and every other process a short one naming it (nobody waits forever)."""
        if not self.several:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as err:  # told to the others, then raised here
                error = err
        from accelerate.utils import broadcast_object_list

        message = [None if error is None else f"{type(error).__name__}: {error}"]
        broadcast_object_list(message, from_process=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise RuntimeError(f"the main process failed while it {what}: {message[0]}")
        return result

    def share(self, batch_size: int, where: str) -> tuple[int, int]:
        """(first position, count) of this process's share of a global micro-batch of ``batch_size``."""
        return share_of(batch_size, self.index, self.count, where)

    def global_mean(self, total: torch.Tensor, count) -> torch.Tensor:
        """``total`` (this process's sum over its items) divided by the global item count over the
        number of processes: the processes' losses then average to the single-process mean. Every
        process must call it for every micro-batch (with a zero sum and count when it has no items)."""
        if not self.several:
            return total / count
        n = torch.as_tensor(count, dtype=torch.float64, device=self.device).reshape(())
        torch.distributed.all_reduce(n)
        return total / (n.to(total.device, total.dtype) / self.count).clamp_min(1e-12)

    def no_sync(self, accelerator, pmodel):
        """The forwards' context: DDP's reducer stays idle (``sync_gradients`` averages instead)."""
        return accelerator.no_sync(pmodel) if self.several else contextlib.nullcontext()

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the processes (a missing gradient counts as zeros),
        in flattened buckets of one dtype and device."""
        if not self.several:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        for p in params:
            key = (p.grad.dtype, p.grad.device)
            group = buckets.setdefault(key, [[]])
            if sum(g.numel() * g.element_size() for g in group[-1]) >= _BUCKET_BYTES:
                group.append([])
            group[-1].append(p.grad)
        for groups in buckets.values():
            for grads in groups:
                flat = _flatten_dense_tensors(grads)
                torch.distributed.all_reduce(flat)
                flat /= self.count
                for g, mean in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                    g.copy_(mean)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in process order (one object on a single process)."""
        if not self.several:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])
