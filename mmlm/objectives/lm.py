"""``lm``: next-token cross-entropy on the supervised tokens (labels other than -100), averaged over
them: the loss of transformers' causal LMs. On several processes, averaged over the supervised tokens
of the global micro-batch (``StepInfo.global_mean``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmlm.objectives._base import Objective, ObjectiveOptions
from mmlm.processor import IGNORE_INDEX
from mmlm.registry import OBJECTIVES


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` where the label is supervised,
    computed as transformers computes it (labels shifted by padding, logits in fp32), so the same
    batch gives the same bits either way."""
    target = F.pad(labels.to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy over the supervised tokens, and their number."""
    target = F.pad(labels.to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    total = F.cross_entropy(flat, target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (target != IGNORE_INDEX).sum()


class LMOptions(ObjectiveOptions):
    pass


@OBJECTIVES.register("lm", options=LMOptions, summary="next-token loss on the supervised (assistant) tokens")
class LMObjective(Objective):
    def __call__(self, output, batch, step) -> dict[str, torch.Tensor]:
        # pruning inside the LLM leaves logits for its kept positions only, with the labels gathered to them
        labels = output.labels_for(batch["labels"])
        if step.processes == 1:
            return {"lm": causal_lm_loss(output.logits, labels)}
        return {"lm": step.global_mean(*causal_lm_loss_sum(output.logits, labels))}
