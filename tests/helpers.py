"""Tiny pipeline configs for tests: a 2-block ViT on 32 px images and a 2-layer Llama of width 64."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

from mmlm.config import parse_config

TINY_LLM = {
    "type": "scratch",
    "config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
    },
    "tokenizer": {"type": "word", "vocab_size": 200},
}

# a 2-layer CLIP/SigLIP vision tower on 32 px images (transformers config fields)
TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, intermediate_size=64
)

TINY_ENCODER = {
    "type": "timm",
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
}


def tiny_raw(data_path: str | None = None, n: int = 40, steps: int = 6, image_size: int = 32, **stage) -> dict:
    raw = {
        "name": "tiny",
        "model": {
            "encoders": {"image": copy.deepcopy(TINY_ENCODER)},
            "connectors": {"image": {"type": "mlp", "depth": 2}},
            "llm": copy.deepcopy(TINY_LLM),
        },
        "processor": {"max_length": 96},
    }
    if data_path is not None:
        raw["train"] = {
            "seed": 0,
            "stages": [
                {
                    "name": "align",
                    "data": [
                        {
                            "format": "shapes",
                            "path": data_path,
                            "n": n,
                            "seed": 3,
                            "image_size": image_size,
                            "task": "captions",
                        }
                    ],
                    "trainable": ["connectors.*"],
                    "lr": 1e-3,
                    "steps": steps,
                    "batch_size": 4,
                    "save_every": 2,
                },
                {
                    "name": "instruct",
                    "data": [
                        {
                            "format": "shapes",
                            "path": data_path,
                            "n": n,
                            "seed": 3,
                            "image_size": image_size,
                            "task": "vqa",
                        }
                    ],
                    "trainable": ["*"],
                    "lr": 1e-3,
                    "steps": steps,
                    "batch_size": 4,
                    "save_every": 2,
                    **stage,
                },
            ],
        }
    return raw


def tiny_config(data_path: str | None = None, overrides=(), **kw):
    return parse_config(tiny_raw(data_path, **kw), overrides)


TEXTS = [
    "describe the image.",
    "what color is the circle?",
    "red",
    "blue",
    "green",
    "what shape is the red object?",
    "circle",
    "square",
    "triangle",
    "how many objects are there?",
    "one",
    "two",
    "three",
    "yes",
    "no",
    "is there a red circle?",
    "top left: a small red circle.",
    "hello there",
    "where is the blue square?",
]


def run_without_open_clip(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import open_clip`` fails (as on the GPU image)."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['open_clip'] = None\n" + code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
