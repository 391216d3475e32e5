"""mmlm: assemble multimodal LLMs from parts declared in YAML.

The exports below are resolved on first use (PEP 562), so ``import mmlm`` and the ``mmlm`` command's
``--help`` do not pay for importing torch and transformers."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load_config", "build", "load", "MultimodalLM", "Processor"]

_EXPORTS = {
    "load": "mmlm.checkpoint",
    "load_config": "mmlm.config",
    "build": "mmlm.model",
    "MultimodalLM": "mmlm.model",
    "Processor": "mmlm.processor",
}

if TYPE_CHECKING:  # pragma: no cover
    from mmlm.checkpoint import load
    from mmlm.config import load_config
    from mmlm.model import MultimodalLM, build
    from mmlm.processor import Processor


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmlm' has no attribute {name!r}")
