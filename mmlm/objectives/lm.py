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
    return token_loss(logits, F.pad(labels.to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:])


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each logit against its target (``targets``: already shifted, IGNORE_INDEX
    where nothing is learnt), in fp32."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX, reduction=reduction)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The sequence positions whose logit has a target in some row of the batch (the logits the
    ``lm`` loss needs): the LM head can skip every other position (transformers' ``logits_to_keep``)."""
    target = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return (target != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def supervised_cells(labels: torch.Tensor) -> torch.Tensor:
    """``[B, S]``: the (row, position) cells whose logit has a next-token target; the LM head runs on
    these alone where the LLM allows it (``MultimodalLM.llm_head_apart``). Rows whose answers sit at
    different positions (multi-turn samples) then cost their own answers, not the union of all."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX


class LMOptions(ObjectiveOptions):
    pass


@OBJECTIVES.register("lm", options=LMOptions, summary="next-token loss on the supervised (assistant) tokens")
class LMObjective(Objective):
    logits = "supervised"

    def __call__(self, output, batch, step) -> dict[str, torch.Tensor]:
        # pruning inside the LLM leaves logits for its kept positions only, with the labels gathered to them
        targets = output.targets_for(batch["labels"])
        if step.processes == 1:
            return {"lm": token_loss(output.logits, targets)}
        count = (targets != IGNORE_INDEX).sum()
        return {"lm": step.global_mean(token_loss(output.logits, targets, "sum"), count)}
