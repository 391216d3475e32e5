"""``lm``: next-token cross-entropy on the supervised tokens (labels other than -100), averaged over
them: the loss of transformers' causal LMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmlm.objectives._base import Objective, ObjectiveOptions
from mmlm.processor import IGNORE_INDEX
from mmlm.registry import OBJECTIVES


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` where the label is supervised."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
    )


class LMOptions(ObjectiveOptions):
    pass


@OBJECTIVES.register("lm", options=LMOptions, summary="next-token loss on the supervised (assistant) tokens")
class LMObjective(Objective):
    def __call__(self, output, batch, step) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
            raise ValueError(f"{self.where} (lm): the micro-batch supervises no token (every label is -100)")
        return {"lm": causal_lm_loss(output.logits, labels)}
