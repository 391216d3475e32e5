"""``contrastive``: InfoNCE between query and candidate embeddings, on ``pairs`` data (VLM2Vec, LLaVE).

A micro-batch holds B queries and C >= B candidates: the B positives (candidate i is query i's
positive), then every hard negative of the batch (``mmlm/data/pairs.py``). Each is embedded as
``MultimodalLM.embed`` embeds it, with gradients: ``model.pool``, Matryoshka truncation to
``model.embedding.dim`` when set, L2 normalisation. With ``cos_ij = q_i . c_j``, temperature ``tau``
and LLaVE's hardness ``alpha`` (``sg``: stop-gradient)::

    logit_ij = cos_ij / tau + alpha * sg(cos_ij) * [j != i]
    loss     = -1/B sum_i log( exp(logit_ii) / sum_j exp(logit_ij) )

Every candidate but its own positive is a negative of query i: the other queries' positives
(in-batch negatives) and all hard negatives. The hardness term is added after the temperature
scaling, as in ALGORITHMS.md (``s * cos_ij`` with ``s = 1 / tau``, plus ``alpha * sg(cos_ij)`` for
negatives) and LLaVE's own loss: each negative's ``exp(cos_ij / tau)`` is weighted by
``exp(alpha * cos_ij)``, so the harder a negative the more it counts, while the weight itself carries
no gradient. ``alpha: 0`` is plain InfoNCE, ``CE(q c^T / tau)``. ``symmetric`` averages this with the
candidate -> query loss over the positives (positive i against every query; LLaVE:
``(CE_q2c + CE_c2q) / 2``), hardness-weighted the same way.

Several processes (torch.distributed initialised): the candidates (and, for the symmetric loss, the
queries) of every process are gathered with gradients (``torch.distributed.nn.functional.all_gather``)
so each query meets the whole global batch; a process's loss is over its own queries. One process:
no gathering. Gradient accumulation does not enlarge the pool of negatives; GradCache does.

GradCache (``chunk_size``): the queries and candidates are embedded without gradients in chunks of
``chunk_size`` rows; the loss and its gradient with respect to the embeddings are computed on the
whole batch; then each chunk is embedded again, with the random state of its first pass restored
(so dropout draws the same masks), and the cached gradient is back-propagated through it. The
gradients are those of the whole batch while only one chunk's activations are held at a time. The
objective then back-propagates itself (``handles_backward``: see ``objectives/_base.py``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from mmlm.data.pairs import split_rows
from mmlm.embed.extract import normalise
from mmlm.objectives._base import BackwardObjective, ObjectiveOptions, StepInfo
from mmlm.registry import OBJECTIVES


class ContrastiveOptions(ObjectiveOptions):
    temperature: float = Field(0.02, gt=0)  # InfoNCE temperature: cosine similarities are divided by it
    # LLaVE hardness weighting: each negative's logit cos / temperature gets + alpha * cos, with no gradient
    # through that term (harder negatives weigh more); 0: plain InfoNCE
    alpha: float = Field(9.0, ge=0)
    symmetric: bool = False  # also the candidate -> query loss over the positives, averaged with query -> candidate
    # GradCache: embed queries and candidates in chunks of this many rows (whole-batch gradients,
    # one chunk's activations in memory); null: the whole micro-batch in one pass
    chunk_size: int | None = Field(None, gt=0)


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of ``x`` from every process in rank order (with gradients) and where this process's
    rows start in them; ``(x, 0)`` when torch.distributed is not initialised. Processes may hold
    different numbers of rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return x, 0
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
    parts = all_gather(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]), sum(sizes[: dist.get_rank()])


def hardness_ce(cos: torch.Tensor, targets: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """Mean cross-entropy of ``cos / temperature`` (``[N, M]`` cosines) against the ``targets``
    columns, with ``alpha * sg(cos)`` added to every other column (LLaVE)."""
    logits = cos / temperature
    if alpha:
        hard = (alpha * cos.detach()).scatter(1, targets[:, None], 0.0)
        logits = logits + hard
    return F.cross_entropy(logits, targets)


def contrastive_loss(
    q: torch.Tensor, c: torch.Tensor, temperature: float = 0.02, alpha: float = 9.0, symmetric: bool = False
) -> torch.Tensor:
    """The loss of unit query vectors ``q [B, D]`` against unit candidates ``c [C, D]`` whose first B
    rows are the positives (module docstring), candidates gathered across processes."""
    B = q.shape[0]
    rows = torch.arange(B, device=q.device)
    all_c, at = gather_rows(c)
    loss = hardness_ce(q @ all_c.T, rows + at, temperature, alpha)
    if symmetric:
        all_q, at_q = gather_rows(q)
        loss = (loss + hardness_ce(c[:B] @ all_q.T, rows + at_q, temperature, alpha)) / 2
    return loss


class _RandomState:
    """The CPU and (on CUDA) device random state at capture; ``restored()`` replays from it and puts
    the state of the moment back afterwards."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda else [], device_type="cuda"):
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@OBJECTIVES.register(
    "contrastive",
    options=ContrastiveOptions,
    summary="InfoNCE on query / candidate embeddings (pairs data): in-batch and hard negatives, LLaVE, GradCache",
)
class ContrastiveObjective(BackwardObjective):
    data_kind = "pairs"

    def __init__(self, opts: ContrastiveOptions, model, where: str):
        super().__init__(opts, model, where)
        self.model = model  # embedded through model.pool; by reference: the model the trainer trains
        self.handles_backward = opts.chunk_size is not None

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """Unit vectors ``[rows, D]`` of a processor batch, as ``MultimodalLM.embed`` makes them (float32)."""
        return normalise(self.model.pool(batch), self.model.config.model.embedding.dim)

    def loss(self, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        o = self.opts
        return contrastive_loss(q, c, o.temperature, o.alpha, o.symmetric)

    def __call__(self, output, batch, step: StepInfo) -> dict[str, torch.Tensor]:
        device = self.model.device
        q = self.embed(_to(batch["query"], device))
        c = self.embed(_to(batch["candidate"], device))
        return {"contrastive": self.loss(q, c)}

    def backward_step(self, batch, step: StepInfo, scale: float, backward) -> dict[str, torch.Tensor]:
        """GradCache: embed without gradients chunk by chunk, take the loss's gradient with respect
        to the embeddings, then re-embed each chunk (same random state) and back-propagate it."""
        device = self.model.device
        proc, size = self.model.processor, self.opts.chunk_size
        chunks = {side: split_rows(_to(batch[side], device), size, proc) for side in ("query", "candidate")}
        reps: dict[str, list[torch.Tensor]] = {"query": [], "candidate": []}
        states: dict[str, list[_RandomState]] = {"query": [], "candidate": []}
        with torch.no_grad():
            for side, parts in chunks.items():
                for part in parts:
                    states[side].append(_RandomState(device))
                    reps[side].append(self.embed(part))
        q = torch.cat(reps["query"]).requires_grad_()
        c = torch.cat(reps["candidate"]).requires_grad_()
        with torch.enable_grad():
            loss = self.loss(q, c)
            grad_q, grad_c = torch.autograd.grad(loss, [q, c])
        grads = {"query": grad_q, "candidate": grad_c}
        for side, parts in chunks.items():
            cached = grads[side].split([r.shape[0] for r in reps[side]])
            for part, state, g in zip(parts, states[side], cached, strict=True):
                with state.restored():
                    rep = self.embed(part)
                if rep.requires_grad:  # nothing trainable upstream of the embeddings: nothing to do
                    backward((rep * g).sum() * scale)
        return {"contrastive": loss.detach()}
