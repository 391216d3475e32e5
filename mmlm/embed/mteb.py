"""An adapter that lets the MTEB 2 harness run an mmlm model (mteb itself is not imported).

MTEB 2's encoder protocol (``mteb.models.EncoderProtocol``)::

    encode(inputs: DataLoader[BatchedInput], *, task_metadata: TaskMetadata, hf_split: str,
           hf_subset: str, prompt_type: PromptType | None = None, **kwargs) -> Array  # [N, D]

``inputs`` yields batches: dicts of equal-length lists under ``"text"`` and/or ``"image"`` (PIL
images; a path is read as a file). A batch with both is a list of image+text items.
``prompt_type`` is ``PromptType.query`` or ``PromptType.document`` (an enum whose value is the
string; ``"passage"``, MTEB 1's name, is taken too): queries are embedded with the model's query
templates and the instruction, documents with its candidate templates and none. ``None`` (tasks that
are not asymmetric: STS, clustering, classification) embeds as a query.

    from mmlm import load
    from mmlm.embed.mteb import MTEBModel
    results = mteb.evaluate(MTEBModel(load("runs/embed/final")), tasks=mteb.get_tasks(tasks=[...]))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

SIDE_OF_PROMPT = {None: "query", "query": "query", "document": "candidate", "passage": "candidate"}


class MTEBModel:
    """``encode`` in the MTEB 2 protocol over ``model.embed`` (see the module docstring).

    ``instruction`` is given to every query; ``instructions`` maps a task name (``task_metadata.name``)
    to its own query instruction. ``dim`` truncates (Matryoshka), ``batch_size`` is the forward batch."""

    def __init__(
        self,
        model,
        *,
        instruction: str | None = None,
        instructions: Mapping[str, str] | None = None,
        dim: int | None = None,
        batch_size: int = 32,
    ):
        self.model = model
        self.instruction = instruction
        self.instructions = dict(instructions or {})
        self.dim = dim
        self.batch_size = batch_size

    @staticmethod
    def side(prompt_type: Any) -> str:
        key = getattr(prompt_type, "value", prompt_type)
        if key not in SIDE_OF_PROMPT:
            raise ValueError(f"prompt_type must be query or document (or None), not {prompt_type!r}")
        return SIDE_OF_PROMPT[key]

    @staticmethod
    def items(batch: Mapping[str, Any]) -> list[Any]:
        """One batch -> the items ``model.embed`` takes: texts, images, or {text, image} pairs."""
        texts, images = batch.get("text"), batch.get("image")
        if texts is None and images is None:
            raise ValueError(f"an MTEB batch needs 'text' and/or 'image'; this one has {sorted(batch)}")
        if images is not None:
            images = [Path(im) if isinstance(im, str) else im for im in images]
        if texts is None:
            return list(images)
        if images is None:
            return list(texts)
        if len(texts) != len(images):
            raise ValueError(f"an MTEB batch has {len(texts)} texts but {len(images)} images")
        return [{"text": t, "image": im} for t, im in zip(texts, images, strict=True)]

    def encode(
        self,
        inputs: Iterable[Mapping[str, Any]],
        *,
        task_metadata: Any = None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """float32 ``[N, D]`` L2-normalised vectors of every item of every batch, in order."""
        side = self.side(prompt_type)
        instruction = None
        if side == "query":
            instruction = self.instructions.get(getattr(task_metadata, "name", None), self.instruction)
        out = [
            self.model.embed(
                self.items(batch), instruction=instruction, dim=self.dim, side=side, batch_size=self.batch_size
            )
            for batch in inputs
        ]
        width = self.dim or self.model.config.model.embedding.dim or self.model.embedding_width
        return (torch.cat(out) if out else torch.zeros(0, width)).numpy().astype(np.float32, copy=False)
