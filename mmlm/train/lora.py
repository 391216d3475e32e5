"""LoRA adapters on the LLM or an encoder, per stage, through peft.

A stage's ``lora: {llm: {r, alpha, dropout, target_modules}, image: {...}}`` injects peft's LoRA
layers into the named parts (``llm``, or an encoder by its modality) when the stage starts
(``peft.inject_adapter_in_model``: the part stays the same module, its linear layers gain
``lora_A``/``lora_B`` beside their ``base_layer``). In that stage the adapters train and the rest of
the part is frozen whatever ``trainable`` says; ``trainable`` decides for the other parts. Adapters
stay in the model after their stage (frozen in stages that do not name their part); a later stage
that names the part again trains the same adapters, and must give the same settings.

The model records what it carries (``MultimodalLM.lora``), checkpoints list it in their header, and
loading injects the same adapters before reading the tensors. Since a base layer's weight keeps its
source's digest under its new name (``.base_layer.``), a checkpoint of a pretrained LLM with LoRA
holds only the adapters and the parts that changed. ``merge_lora`` folds the adapters into the base
weights (``mmlm export --merge-lora``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mmlm.errors import ConfigError

ADAPTER_MARK = ".lora_"  # in the names of peft's adapter parameters (lora_A, lora_B, lora_embedding_*)
BASE_MARK = ".base_layer"  # between a wrapped layer's name and its original parameters


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0)  # rank of each adapter
    alpha: float = Field(32, gt=0)  # scaling: the update is (alpha / r) * B @ A
    dropout: float = Field(0.05, ge=0, lt=1)  # dropout on the adapter's input
    # linear layers to adapt, by the last part of their name (q_proj, v_proj, ...) or "all-linear":
    # every nn.Linear of the part except the LLM's output head
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # nf4: the LLM's base weights loaded in 4-bit NormalFloat by bitsandbytes (QLoRA; CUDA only),
    # the adapters in bf16. Only for the llm part, and only in the first stage that names it
    quantize: Literal["nf4"] | None = None


def canonical(name: str) -> str:
    """A parameter's name as it was before adapters were injected (for the source's digests)."""
    return name.replace(BASE_MARK, "")


def is_adapter(name: str) -> bool:
    return ADAPTER_MARK in name


def part_module(model, part: str, where: str):
    """The module a ``lora`` key names: the LLM (``llm``) or an encoder by its modality."""
    if part == "llm":
        return model.llm
    if part in model.encoders:
        return model.encoders[part]
    raise ConfigError(
        f"no part {part!r} to adapt; the parts are llm and the encoders ({', '.join(model.encoders) or 'none'})",
        where,
    )


def part_prefix(part: str) -> str:
    return "llm." if part == "llm" else f"encoders.{part}."


def _targets(module, opts: LoraOptions, where: str) -> list[str]:
    import torch.nn as nn

    linear = {n for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    if opts.target_modules == "all-linear":
        out = getattr(module, "get_output_embeddings", lambda: None)()
        skip = {n for n, m in module.named_modules() if m is out}
        names = sorted(linear - skip)
    else:
        names = sorted(n for n in linear if n.rsplit(".", 1)[-1] in opts.target_modules)
        found = {n.rsplit(".", 1)[-1] for n in names}
        unknown = [t for t in opts.target_modules if t not in found]
        if unknown:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise ConfigError(
                f"no linear layer named {unknown} in this part; its linear layers end in {suffixes}",
                f"{where}.target_modules",
            )
    if not names:
        raise ConfigError("this part has no linear layer to adapt", f"{where}.target_modules")
    return names


def _check_quantize(opts: LoraOptions, part: str, where: str) -> None:
    if opts.quantize is None:
        return
    if part != "llm":
        raise ConfigError("only the llm's weights can be quantized (QLoRA)", f"{where}.quantize")
    import importlib.util

    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA device (bitsandbytes' 4-bit kernels run on CUDA only)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install 'mmlm[quant]')")
    if missing:
        raise ConfigError(f"quantize: nf4 (QLoRA) needs {' and '.join(missing)}", f"{where}.quantize")


def quantize_nf4(module) -> None:
    """Replace the LLM's linear layers (not its output head) by bitsandbytes' 4-bit NF4 layers in
    place, their weights quantized from the current ones; compute in bf16 (QLoRA)."""
    import bitsandbytes as bnb
    import torch
    import torch.nn as nn

    out = getattr(module, "get_output_embeddings", lambda: None)()
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear) or child is out or isinstance(child, bnb.nn.Linear4bit):
            continue
        q = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
            device=child.weight.device,
        )
        q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if child.bias is not None:
            q.bias = child.bias
        q = q.cuda()
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, leaf, q)


def attach(model, part: str, opts: LoraOptions, where: str) -> bool:
    """Inject ``opts``'s adapters into ``part`` unless it carries them already (with the same
    settings: other ones are refused). Returns whether adapters were added."""
    have = model.lora.get(part)
    if have is not None:
        if have != opts.model_dump(mode="json"):
            raise ConfigError(
                f"the {part} already carries LoRA adapters with {have}, from an earlier stage or the checkpoint; "
                "a stage that adapts it again must give the same settings (or merge them first: mmlm export "
                "--format mmlm --merge-lora)",
                where,
            )
        return False
    from peft import LoraConfig, inject_adapter_in_model

    module = part_module(model, part, where)
    _check_quantize(opts, part, where)
    targets = _targets(module, opts, where)
    if opts.quantize == "nf4":
        quantize_nf4(module)
    cfg = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets)
    device = next(module.parameters()).device
    inject_adapter_in_model(cfg, module, adapter_name="default")
    module.to(device)
    model.lora[part] = opts.model_dump(mode="json")
    return True


def attach_recorded(model, recorded: dict | None, where: str) -> None:
    """Inject the adapters a checkpoint's header lists (``lora``), before its tensors are read."""
    for part, spec in (recorded or {}).items():
        attach(model, part, LoraOptions.model_validate(spec), f"{where}: lora.{part}")


def restrict_to_adapters(model, parts: dict[str, LoraOptions]) -> list[str]:
    """After ``trainable`` was applied: in the parts a stage adapts, only the adapters train; the
    adapters of the other parts stay frozen. Returns the names that train."""
    prefixes = tuple(part_prefix(p) for p in parts)
    for n, p in model.named_parameters():
        if is_adapter(n):
            p.requires_grad_(n.startswith(prefixes))
        elif n.startswith(prefixes):
            p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model) -> list[str]:
    """Fold every adapter into its base weight and put the plain layers back (the model then has the
    parameter names it had before ``attach``). Returns the parts that were merged."""
    from peft.tuners.lora import LoraLayer

    merged = []
    for part in list(model.lora):
        module = part_module(model, part, "lora")
        if model.lora[part].get("quantize"):
            raise ValueError(f"the {part}'s base weights are 4-bit (QLoRA): merging into them would lose the update")
        for name, child in list(module.named_modules()):
            if isinstance(child, LoraLayer):
                child.merge()
                parent_name, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(parent_name) if parent_name else module, leaf, child.get_base_layer())
        del model.lora[part]
        merged.append(part)
    return merged
