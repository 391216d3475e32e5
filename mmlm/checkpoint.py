"""Read checkpoint directories: ``mmlm.load(dir)`` builds the model its ``mmlm.yaml`` names and
loads ``model.safetensors`` into it, strictly (a tensor the model lacks, a misshapen one, or one the
model needs that neither the file nor a pretrained source provides is an error). Loading reads
safetensors only and never unpickles. ``MultimodalLM.save`` writes the directories.

Checkpoints of format 1 (before training objectives were parts) are migrated on read: a ``sea``
connector wrapping another becomes that connector, and a ``sea`` objective joins the stages it
was active in.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmlm.config import PipelineConfig, parse_config, resolve_relative_paths
from mmlm.errors import CheckpointError, ConfigError
from mmlm.model import MultimodalLM, build
from mmlm.storage import CHECKPOINT_FORMAT, refuse_nonempty
from mmlm.train.lora import attach_recorded, is_adapter, merge_lora

log = logging.getLogger(__name__)

# options of the old ``sea`` connector that configured its loss (not its inner connector)
_SEA_LOSS_KEYS = (
    "temperature",
    "label_key",
    "target_grad",
    "labels",
    "word_list",
    "open_clip",
    "top_k",
    "label_temperature",
    "sample",
    "seed",
)


def migrate_format1(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """A format-1 config -> the current one. Returns the config, tensor-name prefix renames (old ->
    new) and a line per change made."""
    raw = copy.deepcopy(raw)
    renames: dict[str, str] = {}
    notes: list[str] = []
    stages = (raw.get("train") or {}).get("stages") or []
    for st in stages:
        old = st.pop("objective", None)
        if old not in (None, "lm"):
            notes.append(f"stage {st.get('name')}: 'objective: {old}' was never read; it trained with lm")
    for m, conn in (raw.get("model", {}).get("connectors") or {}).items():
        if conn.get("type") != "sea":
            continue
        inner = dict(conn.get("inner") or {"type": "mlp"})
        for key in ("in_dim", "out_dim", "fusion"):
            if conn.get(key) is not None:
                inner[key] = conn[key]
        raw["model"]["connectors"][m] = inner
        sea = {"type": "sea", **{k: conn[k] for k in _SEA_LOSS_KEYS if k in conn}}
        if m != "image":
            sea["modality"] = m
        weights = conn.get("stage_weights") or {}
        active = conn.get("stages")
        for st in stages:
            w = weights.get(st.get("name"), conn.get("weight", 1.0))
            if (active is None or st.get("name") in active) and w > 0:
                st.setdefault("objectives", [{"type": "lm"}]).append({**sea, "weight": w})
        fused = conn.get("fusion") is not None
        old_prefix = f"connectors.{m}.inner.inner." if fused else f"connectors.{m}.inner."
        renames[old_prefix] = f"connectors.{m}.inner." if fused else f"connectors.{m}."
        notes.append(f"connector {m}: sea around {inner['type']} -> {inner['type']} + a sea objective in its stages")
    return raw, renames, notes


def read_checkpoint_config(directory) -> tuple[PipelineConfig, dict[str, Any]]:
    """The config a checkpoint was saved with (migrated when older) and its ``mmlm`` metadata; the
    metadata's ``renames`` maps old tensor-name prefixes to current ones."""
    directory = Path(directory)
    f = directory / "mmlm.yaml"
    if not f.is_file():
        raise FileNotFoundError(f"{directory} is not an mmlm checkpoint (no mmlm.yaml)")
    try:
        raw = yaml.safe_load(f.read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"{f}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{f}: not a checkpoint config (no 'model' mapping)")
    meta = raw.pop("mmlm", {})
    fmt = meta.get("format", 1)
    if fmt > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{f}: checkpoint format {fmt} is newer than this mmlm reads ({CHECKPOINT_FORMAT})")
    if fmt == 1:
        raw, meta["renames"], notes = migrate_format1(raw)
        if notes:
            log.warning("%s: migrated a format-1 checkpoint config: %s", directory, "; ".join(notes))
    resolve_relative_paths(raw, directory)  # parts a checkpoint holds are named relative to it (mmlm import)
    try:
        return parse_config(raw), meta
    except ConfigError as err:
        raise CheckpointError(f"{f}: {err}") from None


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, empty, truncated or corrupt one is a
    CheckpointError naming the file."""
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file; the checkpoint is incomplete")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        size = file.stat().st_size
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({size} bytes; truncated or corrupt: {err})"
        ) from None


def load_tensors(
    model: MultimodalLM, tensors: dict[str, torch.Tensor], where: str, complete: bool, fresh: tuple[str, ...] = ()
) -> None:
    """Copy ``tensors`` into ``model``. Every name must be one of the model's, with its shape; with
    ``complete``, every tensor the model needs (all but those a pretrained source gave it, and those
    under the ``fresh`` prefixes, which keep their initialisation) must be there, an alias of a tied
    weight counting as its twin."""
    own = model.state_dict()
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} tensors the model does not have, e.g. {unknown[:3]}")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
            )
    if complete:
        storage = {k: (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) for k, v in own.items()}
        have = {storage[k] for k in tensors}
        missing = [
            k
            for k in own
            if k not in tensors
            and (not k.startswith(model.pretrained_prefixes) or is_adapter(k))  # adapters come from no source
            and not (fresh and k.startswith(fresh))
            and storage[k] not in have
        ]
        if missing:
            raise CheckpointError(
                f"{where}: {len(missing)} tensors the model needs are missing, e.g. {missing[:3]}; "
                "the file and its mmlm.yaml do not belong together"
            )
    model.load_state_dict(tensors, strict=False)


def load(directory, overrides: tuple[str, ...] = (), device: str | None = None) -> MultimodalLM:
    """Load a checkpoint directory written by ``MultimodalLM.save`` (safetensors only)."""
    directory = Path(directory)
    cfg, meta = read_checkpoint_config(directory)
    if overrides:
        cfg = parse_config(cfg.to_dict(), overrides)
    model = _load_weights(build(cfg, tokenizer_dir=str(_tokenizer_dir(directory))), directory, meta)
    if device:
        model.to(device)
    model.eval()
    return model


def _tokenizer_dir(directory: Path) -> Path:
    if not (directory / "tokenizer_config.json").is_file():
        raise CheckpointError(
            f"{directory}: no tokenizer files (tokenizer_config.json); every checkpoint holds the tokenizer "
            "it was trained with, so this one is incomplete"
        )
    return directory


def export_merged(source, out, overwrite: bool = False) -> list[str]:
    """Write checkpoint ``source`` to ``out`` with its LoRA adapters folded into the weights they
    adapt (``mmlm export --format mmlm --merge-lora``); returns the parts merged. A checkpoint
    without adapters is refused, as is a non-empty ``out`` unless ``overwrite``."""
    refuse_nonempty(Path(out), overwrite)
    model = load(source)
    merged = merge_lora(model)
    if not merged:
        raise ValueError(f"{source} carries no LoRA adapters: there is nothing to merge")
    model.save(out)
    return merged


def load_as(directory, config: PipelineConfig, where: str = "train.init_from") -> MultimodalLM:
    """The model ``config`` names with the weights and tokenizer of checkpoint ``directory``, which must
    hold the same parts; only ``model.embedding`` (a new learned pooling starts fresh) and
    ``model.token_reduction`` (reducers hold no weights) may differ. A run that starts from another
    run's checkpoint (``train.init_from``) is built this way."""
    directory = Path(directory)
    saved, meta = read_checkpoint_config(directory)
    free = ("embedding", "token_reduction")
    before = {k: v for k, v in saved.model.model_dump(mode="json").items() if k not in free}
    now = {k: v for k, v in config.model.model_dump(mode="json").items() if k not in free}
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if differ:
        raise ConfigError(
            f"{directory} holds another model: model.{', model.'.join(differ)} differ from this config's "
            "(only model.embedding and model.token_reduction may)",
            where,
        )
    model = build(config, tokenizer_dir=str(_tokenizer_dir(directory)))
    same_pooling = saved.model.embedding.pooling.model_dump() == config.model.embedding.pooling.model_dump()
    return _load_weights(model, directory, meta, fresh=() if same_pooling else ("pooler.",))


def _check_sources(model: MultimodalLM, directory: Path, meta: dict) -> None:
    """Each pretrained source must give the weights it gave when the checkpoint was saved."""
    recorded = meta.get("sources") or {}
    now = model.source_fingerprints()
    changed = sorted(p for p, digest in recorded.items() if p in now and now[p] != digest)
    if changed:
        parts = {
            "llm.": "model.llm",
            **{f"encoders.{n}.": f"model.encoders.{n}" for n in model.config.model.encoders},
        }
        names = ", ".join(parts.get(p, p) for p in changed)
        raise CheckpointError(
            f"{directory}: the pretrained source of {names} now gives other weights than when this checkpoint "
            "was saved (the hub branch moved or the folder was rewritten); pin the revision it was saved with, "
            "or restore that source"
        )


def _load_weights(model: MultimodalLM, directory: Path, meta: dict, fresh: tuple[str, ...] = ()) -> MultimodalLM:
    _check_sources(model, directory, meta)
    attach_recorded(model, meta.get("lora"), str(directory / "mmlm.yaml"))  # adapters before their tensors
    tensors = read_tensors(directory / "model.safetensors")
    for old, new in (meta.get("renames") or {}).items():
        tensors = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in tensors.items()}
    missing = [k for k in meta.get("changed_from_source") or [] if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{directory / 'model.safetensors'}: {len(missing)} tensors the model needs are missing, e.g. "
            f"{missing[:3]} (changed from the pretrained source when saved; the source's would be wrong)"
        )
    tensors = {k: v for k, v in tensors.items() if not k.startswith(fresh)} if fresh else tensors
    load_tensors(model, tensors, str(directory / "model.safetensors"), complete=True, fresh=fresh)
    return model
