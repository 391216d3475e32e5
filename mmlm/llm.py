"""Load the LLM and its tokenizer: a hub id or local directory (``hf``), a GGUF file (``gguf``), or a
config dict trained from scratch with a tokenizer fitted on the training text (``scratch``).

The LLM is a plain Hugging Face ``PreTrainedModel`` used by composition; nothing here subclasses it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmlm.errors import ConfigError
from mmlm.gguf_cache import converted_folder, is_complete, save_converted
from mmlm.registry import LLM_SOURCES

AttnImpl = Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"]
DType = Literal["float32", "bfloat16", "float16"]

# markers of the built-in chat template; a tokenizer trained here gets them as special tokens
CHAT_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", *CHAT_MARKERS.values()]


class LLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # transformers' attention kernel; auto: flash_attention_2 on CUDA with flash-attn installed, else sdpa
    attn_implementation: AttnImpl = "auto"
    dtype: DType = "float32"  # dtype the LLM's weights are built or loaded in (train.precision autocasts on top)


class HFOptions(LLMOptions):
    # options that name files or folders: relative ones are read from the config file's folder
    path_keys: ClassVar[dict[str, str]] = {"path": "local_or_hub", "tokenizer": "local_or_hub"}
    path: str  # hub id or local directory
    revision: str | None = None  # hub branch, tag or commit of the model and tokenizer; null: the default branch
    tokenizer: str | None = None  # another hub id / directory for the tokenizer


class GGUFOptions(LLMOptions):
    path_keys: ClassVar[dict[str, str]] = {"path": "file_or_dir"}
    # a .gguf file, a directory holding one (then ``file`` names it), or ``pkg://PACKAGE/FILE`` for
    # a file shipped inside an installed package (found without importing the package)
    path: str
    file: str | None = None  # the .gguf file inside the directory path; null: its only .gguf file


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # word: one entry per word or punctuation run (unseen ones become <unk>); bpe: byte-level BPE (no unknowns)
    type: Literal["word", "bpe"] = "word"
    vocab_size: int = Field(4096, gt=len(SPECIAL_TOKENS))  # most entries, special tokens included
    min_frequency: int = Field(1, ge=1)  # fewest occurrences in the texts for a word or merge to enter the vocabulary
    lowercase: bool = True  # lowercase all text before tokenizing


class ScratchOptions(LLMOptions):
    config: dict[str, Any]  # transformers config kwargs; must name ``model_type`` (llama, qwen2, ...)
    # the tokenizer fitted on the training texts: {type, vocab_size, min_frequency, lowercase}
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)


@dataclass
class LoadedLLM:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    pretrained: bool  # True when weights came from a source that the checkpoint can reference


def resolve_attn_implementation(requested: str) -> str:
    cuda = torch.cuda.is_available()
    has_fa = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if (cuda and has_fa) else "sdpa"
    if requested == "flash_attention_2" and not (cuda and has_fa):
        missing = [w for w, ok in (("a CUDA device", cuda), ("the flash-attn package", has_fa)) if not ok]
        raise RuntimeError(
            "model.llm.attn_implementation: 'flash_attention_2' needs "
            + " and ".join(missing)
            + "; use 'auto' (flash attention where available, else sdpa), 'sdpa' or 'eager'"
        )
    return requested


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token


@LLM_SOURCES.register("hf", options=HFOptions, summary="any causal LM from a hub id or a local directory")
def load_hf(
    o: HFOptions, texts: Iterable[str] | None = None, tokenizer_dir: str | None = None, skeleton: bool = False
) -> LoadedLLM:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if skeleton:
        return _skeleton(AutoConfig.from_pretrained(o.path, revision=o.revision))
    attn = resolve_attn_implementation(o.attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(
        o.path, revision=o.revision, dtype=_dtype(o.dtype), attn_implementation=attn
    )
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or o.tokenizer or o.path, revision=o.revision)
    _ensure_pad(tok)
    return LoadedLLM(model, tok, pretrained=True)


def resolve_gguf(path: str, file: str | None = None) -> tuple[Path, str]:
    """Return (folder, file name) of a GGUF file given a file, a folder or ``pkg://PACKAGE/FILE``."""
    if path.startswith("pkg://"):
        pkg, _, rest = path[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(pkg)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model.llm.path: package {pkg!r} is not installed")
        p = Path(list(spec.submodule_search_locations)[0]) / rest
    else:
        p = Path(os.path.expanduser(path))
    if p.is_dir():
        if file is None:
            found = sorted(p.glob("*.gguf"))
            if len(found) != 1:
                raise FileNotFoundError(
                    f"model.llm.path: {p} holds {len(found)} .gguf files; name one with model.llm.file"
                )
            return p, found[0].name
        if not (p / file).is_file():
            raise FileNotFoundError(f"model.llm.file: no such file: {p / file}")
        return p, file
    if not p.is_file():
        raise FileNotFoundError(f"model.llm.path: no such GGUF file: {p}")
    return p.parent, p.name


@LLM_SOURCES.register("gguf", options=GGUFOptions, summary="a causal LM from a local GGUF file (dequantised)")
def load_gguf(
    o: GGUFOptions, texts: Iterable[str] | None = None, tokenizer_dir: str | None = None, skeleton: bool = False
) -> LoadedLLM:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = resolve_gguf(o.path, o.file)
    if skeleton:  # the GGUF header only: its metadata holds the architecture
        return _skeleton(AutoConfig.from_pretrained(str(folder), gguf_file=name))
    attn = resolve_attn_implementation(o.attn_implementation)
    # converted once into a transformers folder keyed by the file's digest (mmlm/gguf_cache.py)
    entry = converted_folder(folder / name)
    if entry is not None and is_complete(entry):
        model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=_dtype(o.dtype), attn_implementation=attn)
        tok = None
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=name, dtype=_dtype(o.dtype), attn_implementation=attn
        )
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
        if entry is not None:
            save_converted(entry, model, tok, folder / name)
    if tokenizer_dir and Path(tokenizer_dir, "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    elif tok is None:
        tok = AutoTokenizer.from_pretrained(str(entry))
    _ensure_pad(tok)
    return LoadedLLM(model, tok, pretrained=True)


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec):
    """Fit a word-level or byte-level BPE tokenizer on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if spec.type == "word":
        tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(
            vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, special_tokens=SPECIAL_TOKENS
        )
    else:
        tk = Tokenizer(models.BPE(unk_token=None))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    if spec.lowercase:
        tk.normalizer = normalizers.Lowercase()
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=list(CHAT_MARKERS.values()),
        clean_up_tokenization_spaces=False,
    )
    return tok


@LLM_SOURCES.register(
    "scratch", options=ScratchOptions, summary="a causal LM built from a config, tokenizer fitted on the data"
)
def load_scratch(
    o: ScratchOptions, texts: Iterable[str] | None = None, tokenizer_dir: str | None = None, skeleton: bool = False
) -> LoadedLLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if skeleton:  # parameter names do not depend on the fitted vocabulary's exact size
        return _skeleton(scratch_config(o, o.tokenizer.vocab_size))
    if tokenizer_dir and Path(tokenizer_dir, "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        if texts is None:
            raise ValueError(
                "model.llm: a 'scratch' LLM fits its tokenizer on the training text; none was given "
                "(build it through a training stage, or load a checkpoint that holds the tokenizer)"
            )
        tok = train_tokenizer(texts, o.tokenizer)
    conf = scratch_config(
        o, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    attn = resolve_attn_implementation(o.attn_implementation)
    try:
        model = AutoModelForCausalLM.from_config(conf, attn_implementation=attn, dtype=_dtype(o.dtype))
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(
            f"transformers cannot build this {conf.model_type} model: {_one_line(err)}", "model.llm.config"
        ) from None
    return LoadedLLM(model, tok, pretrained=False)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config it refuses (huggingface_hub's strict dataclass
    validation in transformers 5, ValueError/TypeError before)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub
        return (ValueError, TypeError, KeyError)
    return (ValueError, TypeError, KeyError, StrictDataclassError)


def scratch_config(o: ScratchOptions, vocab_size: int, **token_ids):
    """The transformers config of a from-scratch LLM; a wrong model_type or field is a ConfigError
    naming ``model.llm.config``."""
    from transformers import AutoConfig

    cfg = dict(o.config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ConfigError("required key is missing (e.g. llama, qwen2, gpt2)", "model.llm.config.model_type")
    try:
        return AutoConfig.for_model(model_type, vocab_size=vocab_size, **token_ids, **cfg)
    except _config_errors() as err:
        key = "model.llm.config.model_type" if "Unrecognized model identifier" in str(err) else "model.llm.config"
        raise ConfigError(_one_line(err), key) from None


def _skeleton(conf) -> LoadedLLM:
    """The LLM a config describes with its parameters on the meta device: names and shapes, no
    weights read and no memory taken; no tokenizer."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(conf)
        except (*_config_errors(), RuntimeError) as err:
            raise ConfigError(
                f"transformers cannot build this {conf.model_type} model: {_one_line(err)}", "model.llm"
            ) from None
    return LoadedLLM(model, None, pretrained=False)


def load_llm(
    component, texts: Iterable[str] | None = None, tokenizer_dir: str | None = None, skeleton: bool = False
) -> LoadedLLM:
    """The LLM (and tokenizer) a ``model.llm`` entry names; ``skeleton``: parameters on the meta
    device from the source's config alone (``mmlm config validate``)."""
    kwargs = {"skeleton": True} if skeleton else {}
    return LLM_SOURCES.create(component, texts=texts, tokenizer_dir=tokenizer_dir, where="model.llm", **kwargs)


def decoder_layers(model) -> list | None:
    """The decoder blocks of a Hugging Face causal LM (``model.layers`` of Llama, Qwen, Mistral,
    Gemma, Phi-3, ...; ``h`` of GPT-2), or None when it keeps them elsewhere."""
    base = getattr(model, "base_model", model)
    for attr in ("layers", "h"):
        blocks = getattr(base, attr, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return list(blocks)
    return None


@contextlib.contextmanager
def last_mlp_only_at(model, positions: torch.Tensor | None):
    """For one forward of ``model``: the last decoder block's MLP runs on one position per row
    (``positions [B]``) instead of all of them, the other positions of its output left zero.

    For last-token pooling: every earlier block must run on every token (their keys and values
    are attended to), but the last block's hidden states are read at one position only, and its
    MLP (two thirds of a block's work in Llama-shaped models) is per token. The vectors read are
    those of the full forward (to rounding). Nothing changes when ``positions`` is None, when the
    model keeps its blocks elsewhere, or while gradients are on under gradient checkpointing (the
    recomputation in backward would run without the cut)."""
    blocks = decoder_layers(model)
    mlp = getattr(blocks[-1], "mlp", None) if blocks else None
    # transformers 5.x renamed is_gradient_checkpointing (the old name warns)
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    checkpointing = torch.is_grad_enabled() and getattr(model, flag, False)
    if positions is None or not isinstance(mlp, torch.nn.Module) or checkpointing:
        yield
        return
    shape: list[torch.Size] = []

    def before(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        shape.append(x.shape)
        rows = torch.arange(x.shape[0], device=x.device)
        return (x[rows, positions.to(x.device)].unsqueeze(1), *args[1:]), kwargs

    def after(module, args, kwargs, out):
        first = out[0] if isinstance(out, tuple) else out
        full = first.new_zeros(shape.pop())
        rows = torch.arange(full.shape[0], device=full.device)
        full = full.index_put((rows, positions.to(full.device)), first[:, 0])
        return (full, *out[1:]) if isinstance(out, tuple) else full

    handles = [
        mlp.register_forward_pre_hook(before, with_kwargs=True),
        mlp.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
