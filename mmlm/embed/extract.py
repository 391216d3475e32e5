"""Items -> prompts -> pooled, L2-normalised vectors.

An item is a text (``str``), an image (a PIL image or a ``pathlib.Path``), or a mapping with
``text`` and/or ``image`` and optionally ``instruction``. The config's prompt templates
(``model.embedding.query`` / ``candidate``) say how each kind is written; nothing about prompts is
in the code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmlm.config import EmbeddingConfig, PromptSet
from mmlm.errors import ConfigError, SampleError
from mmlm.images import load_image
from mmlm.modalities import IMAGE_PLACEHOLDER

SIDES = ("query", "candidate")


def as_item(item: Any, index: int | None = None) -> dict[str, Any]:
    """The mapping form of an item (``text``, ``image``, ``instruction``)."""
    if isinstance(item, str):
        return {"text": item}
    if isinstance(item, (Image.Image, Path)):
        return {"image": item}
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"text", "image", "instruction", "id"})
        if unknown:
            raise SampleError(f"unknown key(s) {unknown}; an item has text, image, instruction", "bad format", index)
        text, image = item.get("text"), item.get("image")
        if text is not None and not isinstance(text, str):
            raise SampleError("'text' must be a string", "bad format", index)
        if (text is None or text == "") and image is None:
            raise SampleError("an item needs a text or an image (or both)", "empty item", index)
        return dict(item)
    raise SampleError(
        f"an item is a text, an image (PIL image or pathlib.Path) or a mapping, not {type(item).__name__}",
        "bad format",
        index,
    )


def prompts_for(cfg: EmbeddingConfig, side: str) -> PromptSet:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    return cfg.candidate if side == "candidate" and cfg.candidate is not None else cfg.query


def render(item: dict[str, Any], prompts: PromptSet, instruction: str | None = None, side: str = "query") -> str:
    """The prompt an item is embedded as. ``{instruction}`` is the item's own instruction, else the
    one given, written with the ``instruction`` template (empty when there is none)."""
    text, has_image = item.get("text") or "", item.get("image") is not None
    kind = "both" if text and has_image else "image" if has_image else "text"
    template = getattr(prompts, kind)
    where = f"model.embedding.{side}.{kind}"
    wants = template.count(IMAGE_PLACEHOLDER)
    if wants != (1 if has_image else 0):
        raise ConfigError(
            f"{template!r} has {wants} {IMAGE_PLACEHOLDER}; a template for this kind needs {1 if has_image else 0}",
            where,
        )
    instr = item.get("instruction", instruction)
    if instr and "{instruction}" not in template:
        raise ConfigError(f"{template!r} has no {{instruction}}, so the instruction {instr!r} would be ignored", where)
    instr_text = prompts.instruction.replace("{instruction}", instr) if instr else ""
    # str.replace, not str.format: braces in a user's text stay as they are
    return template.replace("{instruction}", instr_text).replace("{text}", text)


def read_image(image: Any, max_pixels: int) -> Image.Image:
    return load_image(image, max_pixels) if isinstance(image, (str, os.PathLike)) else image


@torch.no_grad()
def embed(
    model,
    items: Sequence[Any],
    instruction: str | None = None,
    dim: int | None = None,
    side: str = "query",
    batch_size: int = 32,
) -> torch.Tensor:
    """``[len(items), D]`` float32 L2-normalised vectors (``D = dim`` when given: Matryoshka)."""
    cfg: EmbeddingConfig = model.config.model.embedding
    prompts = prompts_for(cfg, side)
    proc = model.processor
    limit = proc.config.max_image_pixels
    dim = dim or cfg.dim
    was_training = model.training
    if was_training:  # switching modes walks every module: only when needed
        model.eval()
    out = []
    try:
        for start, chunk in ((i, items[i : i + batch_size]) for i in range(0, len(items), batch_size)):
            encoded = []
            for j, raw in enumerate(chunk):
                item = as_item(raw, start + j)
                image = item.get("image")
                media = {"image": [read_image(image, limit)]} if image is not None else None
                prompt = render(item, prompts, instruction, side)
                encoded.append(proc.encode_prompt(prompt, media, cfg.chat_template, index=start + j))
            batch = proc.collate(encoded)
            out.append(model.pool(batch).float().cpu())
    finally:
        if was_training:
            model.train()
    vectors = torch.cat(out) if out else torch.zeros(0, model.embedding_width)
    return normalise(vectors, dim)


def normalise(vectors: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Matryoshka truncation to the first ``dim`` values, then L2 normalisation."""
    if dim is not None:
        if not 0 < dim <= vectors.shape[-1]:
            raise ValueError(f"dim={dim} is not between 1 and the embedding width {vectors.shape[-1]}")
        vectors = vectors[..., :dim]
    return torch.nn.functional.normalize(vectors.float(), dim=-1)
