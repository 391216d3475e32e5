"""The objective contract.

A stage optimises a weighted sum of objectives::

    objectives: [{type: lm}, {type: sea, weight: 1.0, temperature: 0.1}]

An objective is a class registered in ``mmlm.registry.OBJECTIVES`` with its options model (a
subclass of ``ObjectiveOptions``: ``weight`` plus its own typed options). The trainer builds it once
per stage with ``(options, model, where)`` and calls it on every micro-batch:

``objective(output, batch, step) -> {name: loss}``

- ``output`` is the model's ``MultimodalOutput``: ``logits``, ``hidden_states`` (when the objective
  sets ``needs_hidden_states``) and ``media_tokens``. When every objective of a stage declares that
  it reads the ``logits`` of supervised positions only (or none), the LM head runs on those
  positions alone: ``output.positions`` names them and ``output.targets_for(labels)`` gives each
  logit's next-token target (the connector output per modality,
  ``[items, M, D]``, as transformers' ``image_hidden_states``).
- ``batch`` is the processor's batch: ``input_ids``, ``attention_mask``, ``labels``, one tensor per
  modality under its batch key (``pixel_values`` for images), and ``media_meta`` (per-item
  annotations from the data, such as per-patch word labels).
- ``step`` says where the micro-batch is (stage, position) and derives seeds from it, so any
  randomness an objective draws is the same when a run resumes. On several processes the batch is
  this process's share of the global micro-batch; an objective that averages over items whose
  number varies between shares (supervised tokens, visual tokens) returns
  ``step.global_mean(sum, count)`` so that the processes together compute the global batch's mean.

It returns unweighted losses by name (an empty dict when the batch gives it nothing to do); the
trainer multiplies them by ``weight`` and sums. What it needs of the model (the LLM's input
embeddings, the tokenizer, an encoder's preprocessing) it takes by reference at build time. An
objective is not an ``nn.Module`` and holds no trainable weights (what is learned lives in the
model, so it is saved with it); a training-time helper such as SEA's frozen CLIP scorer is a plain
attribute of the objective, so it never reaches the model's state dict, the optimizer or a
checkpoint. ``ObjectiveOptions.texts`` names the words a from-scratch tokenizer must cover for it.

Two class attributes extend this for objectives that embed pairs (``contrastive``):

- ``data_kind``: the records it trains on, ``"conversations"`` (the default: llava, hf, shapes) or
  ``"pairs"`` (the ``pairs`` format). It must match the ``data_kind`` of every data source of the
  stage (``SourceOptions.data_kind``); the config check refuses a stage that mixes them, naming
  ``train.stages.N.objectives`` (or ``.data``). On pairs data a micro-batch is
  ``{"query": batch, "candidate": batch}`` (two processor batches; ``mmlm/data/pairs.py``), the
  trainer runs no forward of its own and ``output`` is None: the objective runs the model it was
  built with (``model.pool``).
- ``handles_backward``: when true (an instance of a ``BackwardObjective`` may set it from its
  options), the trainer does not call ``objective(output, batch, step)`` and back-propagate the
  sum; it calls
  ``objective.backward_step(batch, step, scale, backward)`` instead, which computes the losses,
  back-propagates ``scale * sum(losses)`` through ``backward`` (accelerate's, so mixed-precision loss
  scaling applies) in as many passes as it likes (GradCache), and returns the losses, unweighted and
  detached, for logging. ``scale`` is the objective's weight over the stage's ``grad_accum``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmlm.registry import OBJECTIVES


class ObjectiveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    weight: float = Field(1.0, ge=0)  # multiplies every loss the objective returns

    def texts(self) -> list[str]:
        """Words this objective feeds the LLM (a from-scratch tokenizer is fitted to cover them)."""
        return []


def _local_mean(total: torch.Tensor, count) -> torch.Tensor:
    return total / count


def _only(obj: Any) -> list[Any]:
    return [obj]


@dataclass(frozen=True)
class StepInfo:
    stage: str
    position: int  # the micro-batch's index in its stage
    seed: Callable[[str], int]  # seed for a purpose at this position: seed("sea-labels")
    # several processes (mmlm/train/processes.py): how many; the mean of a loss over the global
    # micro-batch from this process's sum and item count; an object from every process, in process
    # order. Both are collectives: every process calls them on every micro-batch, the same number of
    # times (with a zero sum and count 0, or an empty object, when its share has nothing).
    processes: int = 1
    global_mean: Callable[[torch.Tensor, Any], torch.Tensor] = _local_mean
    gather: Callable[[Any], list[Any]] = _only


class Objective(abc.ABC):
    needs_hidden_states: ClassVar[bool] = False
    # which of the LLM's logits it reads: "all", "supervised" (positions with a next-token target:
    # the trainer then runs the LM head on those only) or "none"
    logits: ClassVar[str] = "all"
    data_kind: ClassVar[str] = "conversations"  # or "pairs": see the module docstring
    handles_backward: bool = False  # True: the trainer calls backward_step instead of __call__

    def __init__(self, opts: ObjectiveOptions, model, where: str):
        self.opts = opts
        self.where = where

    @abc.abstractmethod
    def __call__(self, output, batch: dict[str, Any], step: StepInfo) -> dict[str, torch.Tensor]:
        """Unweighted named losses for one micro-batch."""


class BackwardObjective(Objective):
    """An objective that can back-propagate itself (GradCache): it implements ``backward_step``, and
    the trainer calls it instead of ``__call__`` whenever the instance sets ``handles_backward``."""

    @abc.abstractmethod
    def backward_step(
        self, batch: dict[str, Any], step: StepInfo, scale: float, backward: Callable[[torch.Tensor], None]
    ) -> dict[str, torch.Tensor]:
        """Back-propagate ``scale`` times the sum of the micro-batch's losses with ``backward`` and
        return the unweighted losses, detached."""


def build_objectives(stage, model, where: str) -> list[Objective]:
    """The objectives a stage lists, bound to ``model``; ``where`` is the stage's key path."""
    out = []
    for j, comp in enumerate(stage.objectives):
        at = f"{where}.objectives.{j}"
        obj = OBJECTIVES.create(comp, model, at, where=at)
        if obj.handles_backward and not isinstance(obj, BackwardObjective):
            raise TypeError(f"{at}: {type(obj).__name__} sets handles_backward but is no BackwardObjective")
        out.append(obj)
    return out
