"""mmlm: assemble multimodal LLMs from parts declared in YAML."""

from mmlm.checkpoint import load
from mmlm.config import load_config
from mmlm.model import MultimodalLM, build
from mmlm.processor import Processor

__all__ = ["load_config", "build", "load", "MultimodalLM", "Processor"]
__version__ = "0.1.0"
