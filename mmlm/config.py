"""Typed schema of a pipeline YAML.

``load_config(path, overrides)`` reads the YAML, applies ``--set a.b.1.c=value`` overrides, checks
every key and type, and checks each component's ``type`` against its registry and the component's
own options model. Every error names the full key path (``model.connectors.image.type``) and, where
there is a closed set, the valid choices.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mmlm.errors import ConfigError
from mmlm.images import DEFAULT_MAX_PIXELS
from mmlm.modalities import MODALITIES
from mmlm.registry import CONNECTORS, DATA_FORMATS, ENCODERS, LLM_SOURCES, OBJECTIVES, POOLINGS, REDUCERS
from mmlm.train.lora import LoraOptions


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Part(BaseModel):
    """A registry-built part: one key names it (``type``; ``format`` for data), every other key is one
    of its options, checked against the part's options model. The typed options are parsed once, when
    the config is validated, and kept for building."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    name_key: ClassVar[str] = "type"
    _parsed: BaseModel | None = PrivateAttr(None)

    @property
    def name(self) -> str:
        return getattr(self, self.name_key)

    def options(self) -> dict[str, Any]:
        """The raw options as written in the YAML."""
        return dict(self.model_extra or {})

    def parsed(self, registry, where: str) -> BaseModel:
        if self._parsed is None:
            self._parsed = registry.parse(self.name, self.options(), where, key=self.name_key)
        return self._parsed


class Component(Part):
    type: str


class DataSource(Part):
    """One data source of a stage; ``format`` picks the reader (llava, hf, shapes)."""

    name_key: ClassVar[str] = "format"
    format: str  # the reader: llava, hf or shapes (below)
    # how many times the source's samples are used per epoch (1.5: all once, then the first half again)
    weight: float = Field(1.0, gt=0)


class PromptSet(Strict):
    """How an item is written before it is embedded: ``{text}`` and ``{instruction}`` are filled in,
    ``<image>`` stands for the image. One template per kind of item."""

    text: str = "{instruction}{text}"  # a text alone (E5-V: "{text}\nSummary above sentence in one word:")
    image: str = "{instruction}<image>"  # an image alone (E5-V: "<image>\nSummary above image in one word:")
    both: str = "{instruction}<image>\n{text}"  # an image with a text (VLM2Vec: instruction, image, question)
    instruction: str = "{instruction}\n"  # how an instruction is written where a template says {instruction}


class EmbeddingConfig(Strict):
    """How ``MultimodalLM.embed`` turns an item into one vector (``mmlm embed``, retrieval, the
    contrastive objective)."""

    pooling: Component = Field(default_factory=lambda: Component(type="last"))  # last, mean or latent_attention
    query: PromptSet = Field(default_factory=PromptSet)  # templates for queries (and for candidates by default)
    candidate: PromptSet | None = None  # templates for candidates when they differ (VLM2Vec, GME)
    # wrap the prompt in a user turn of the chat template and pool at the end of its generation prompt;
    # false: the plain prompt with the tokenizer's end token appended (by mmlm, whatever the tokenizer does)
    chat_template: bool = True
    dim: int | None = Field(None, gt=0)  # Matryoshka: keep the first dim values (then renormalise)


class ModelConfig(Strict):
    encoders: dict[str, Component] = Field(default_factory=dict)  # modality (image, audio, video) -> encoder part
    connectors: dict[str, Component] = Field(default_factory=dict)  # modality -> connector part (one per encoder)
    llm: Component  # the causal LM part: hf, gguf or scratch
    # a learned position embedding per media token, added in the LLM's space after the connector
    # (zero at init): tells the LLM which token of an image it is reading
    media_position: dict[str, Literal["learned"]] = Field(default_factory=dict)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)  # how the model embeds items
    # modality -> a reducer (mmlm/reduce/): merges its tokens before the LLM (tome, visionzip) or
    # prunes them inside it (fastv; aim does both); at most one reducer that prunes
    token_reduction: dict[str, Component] = Field(default_factory=dict)

    @field_validator("encoders", "connectors", "media_position", "token_reduction")
    @classmethod
    def _modalities(cls, v: dict):
        for m in v:
            if m not in MODALITIES:
                raise ValueError(f"unknown modality {m!r}; valid choices: {', '.join(MODALITIES)}")
        return v

    @model_validator(mode="after")
    def _pairs(self):
        for m in self.encoders:
            if m not in self.connectors:
                raise ValueError(f"encoder {m!r} has no connector; add model.connectors.{m}")
        for m in self.connectors:
            if m not in self.encoders:
                raise ValueError(f"connector {m!r} has no encoder; add model.encoders.{m}")
        for m in self.token_reduction:
            if m not in self.encoders:
                raise ValueError(
                    f"token_reduction.{m}: no encoder {m!r}; encoders: {', '.join(self.encoders) or 'none'}"
                )
        for m in self.media_position:
            if m not in self.encoders:
                raise ValueError(
                    f"media_position.{m}: no encoder {m!r}; encoders: {', '.join(self.encoders) or 'none'}"
                )
        return self


class ProcessorConfig(Strict):
    # tokens per sample, media tokens included; a longer sample is rejected (never truncated)
    max_length: int = Field(512, gt=8)
    # an image file larger than this is refused (a sample error) before it is decoded
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    padding_side: Literal["left", "right"] = "right"  # where batches are padded in training
    # auto: the LLM tokenizer's own chat template when it has one, else mmlm's built-in markers
    chat_template: Literal["auto", "builtin"] = "auto"
    system_prompt: str | None = None  # a system turn put before every conversation that has none
    # how an image meets the encoder's input size: squash resizes it ignoring its aspect ratio;
    # pad centres it on a canvas of the encoder's aspect filled with the encoder's mean colour
    # (LLaVA's expand2square), then resizes; crop keeps the largest centred box of that aspect
    resize: Literal["squash", "pad", "crop"] = "squash"


Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["no", "fp16", "bf16"]


class StageConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # the stage's checkpoint is OUT/stages/NAME
    data: list[DataSource] = Field(min_length=1)  # data sources: format, weight and the reader's options
    # what the stage optimises: a weighted sum of registered objectives (mmlm/objectives/)
    objectives: list[Component] = Field(default_factory=lambda: [Component(type="lm")], min_length=1)
    objective: None = Field(None, exclude=True)  # replaced by ``objectives``; refused with a pointer
    # glob patterns over parameter names (connectors.*, llm.model.layers.*, encoders.image.*); the rest is frozen
    trainable: list[str] = Field(default_factory=lambda: ["*"])
    frozen: list[str] = Field(default_factory=list)  # patterns taken out of trainable
    lr: float = Field(1e-4, gt=0)  # peak learning rate (AdamW)
    lr_groups: dict[str, float] = Field(default_factory=dict)  # pattern -> its own peak learning rate
    weight_decay: float = Field(0.0, ge=0)  # AdamW decay, on matrices only (not biases or norms)
    steps: int | None = Field(None, gt=0)  # optimizer steps; give steps or epochs
    epochs: float | None = Field(None, gt=0)  # passes over the stage's data (fractions allowed)
    batch_size: int = Field(8, gt=0)  # samples per micro-batch
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer step
    warmup_steps: int = Field(0, ge=0)  # linear warmup steps; when 0, warmup_ratio decides
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # warmup as a fraction of the stage's steps
    schedule: Schedule = "cosine"  # learning rate after warmup
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # the schedule's floor, as a fraction of the peak
    precision: Precision = "no"  # mixed precision through accelerate (bf16/fp16 autocast) or fp32
    gradient_checkpointing: bool = False  # recompute the LLM's activations in backward to save memory
    # LoRA adapters (peft) on the llm and/or encoders by modality: {llm: {r, alpha, dropout, target_modules}};
    # in this stage the adapters train and the rest of each adapted part is frozen (mmlm/train/lora.py)
    lora: dict[str, LoraOptions] = Field(default_factory=dict)
    max_grad_norm: float | None = 1.0  # gradient clipping; null turns it off
    save_every: int = Field(200, gt=0)  # steps between saved states for --resume
    eval_every: int | None = Field(None, gt=0)  # steps between evaluations on train.eval (and at the end)
    # a sample that cannot be used (missing/corrupt image, too long, bad format): stop, or skip and count it
    on_bad_sample: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0)  # processes preparing batches; the batches are the same with any number
    # several samples of a micro-batch share a row (position ids restart, attention stays within each
    # sample): the same loss with less padding (mmlm/processor.py: pack_rows)
    packing: bool = False
    pack_tokens: int | None = Field(None, gt=0)  # a packed row's token budget; null: processor.max_length

    @field_validator("objective", mode="before")
    @classmethod
    def _old_objective(cls, v):
        raise ValueError(
            f"'objective: {v}' was replaced by 'objectives', a list of weighted objectives, "
            "e.g. objectives: [{type: lm}, {type: sea, weight: 1.0}]"
        )

    @field_validator("objectives")
    @classmethod
    def _unique_objectives(cls, v: list[Component]):
        types = [o.type for o in v]
        dup = sorted({t for t in types if types.count(t) > 1})
        if dup:
            raise ValueError(f"objective(s) {dup} listed more than once")
        return v

    @model_validator(mode="after")
    def _length(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'steps' or 'epochs'")
        return self


class EvalConfig(Strict):
    data: list[DataSource] = Field(min_length=1)  # questions with answers (a questions JSONL or LLaVA JSON)
    max_questions: int | None = Field(None, gt=0)  # evaluate on the first N only (all by default)
    batch_size: int = Field(64, gt=0)  # questions generated together
    max_new_tokens: int = Field(8, gt=0)  # answer length limit, in tokens


class TrainConfig(Strict):
    seed: int = 0  # every random choice (init, data order, dropout) derives from it
    stages: list[StageConfig] = Field(min_length=1)  # run in order; each starts from the previous one's weights
    eval: EvalConfig | None = None  # held-out questions for eval_every
    threads: int | None = Field(None, gt=0)  # CPU threads for torch during the run (default: torch's own)
    log_every: int = Field(50, gt=0)  # steps between progress lines; the loss shown is their mean
    # a checkpoint the run starts from (weights and tokenizer) instead of building the model: it must
    # hold the parts model: names; only model.embedding may differ (e.g. an embedding stage after chat)
    init_from: str | None = None

    @model_validator(mode="after")
    def _unique(self):
        names = [s.name for s in self.stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {sorted(dup)}")
        return self


class PipelineConfig(Strict):
    name: str = "mmlm"  # the model's name; runs/NAME is the default run folder
    model: ModelConfig  # the parts: encoders, connectors, LLM
    processor: ProcessorConfig = Field(default_factory=ProcessorConfig)  # text and image preparation
    train: TrainConfig | None = None  # the training stages (a config for inference only has none)

    def stage(self, name: str) -> StageConfig:
        if self.train is None:
            raise ConfigError("this config declares no training stages", "train")
        for s in self.train.stages:
            if s.name == name:
                return s
        raise ConfigError(
            f"no stage named {name!r}; stages: {', '.join(s.name for s in self.train.stages)}",
            "train.stages",
        )

    def to_dict(self) -> dict[str, Any]:
        # nulls are kept: a key set to null (max_grad_norm: null) must not read back as its default
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# overrides and variables


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b.1.c=value`` assignment in place. List items can be addressed by index or,
    when they are mappings with a ``name`` key, by that name (``train.stages.align.lr=1e-3``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value", "--set")
    key, value = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {assignment!r} names no key", "--set")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = None
            if re.fullmatch(r"-?\d+", part):
                idx = int(part)
                if not -len(node) <= idx < len(node):
                    raise ConfigError(f"index {idx} out of range (the list has {len(node)} items)", where)
            else:
                for j, item in enumerate(node):
                    if isinstance(item, dict) and item.get("name") == part:
                        idx = j
                if idx is None:
                    raise ConfigError(f"no list item named {part!r}", where)
            if last:
                node[idx] = _parse_value(value)
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = _parse_value(value)
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"cannot set a key inside a {type(node).__name__}", where)


def _substitute(obj: Any, variables: dict[str, str]) -> Any:
    if isinstance(obj, str):

        def rep(m):
            name = m.group(1)
            if name in variables:
                return str(variables[name])
            if name in os.environ:
                return os.environ[name]
            raise ConfigError(f"unknown variable ${{{name}}}; known: {', '.join(sorted(variables))}")

        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", rep, obj)
    if isinstance(obj, list):
        return [_substitute(v, variables) for v in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, variables) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------
# validation


def validate_components(cfg: PipelineConfig) -> None:
    """Check every part's name against its registry and its options against its options model."""
    for m, comp in cfg.model.encoders.items():
        comp.parsed(ENCODERS, f"model.encoders.{m}")
    for m, comp in cfg.model.connectors.items():
        comp.parsed(CONNECTORS, f"model.connectors.{m}")
    cfg.model.llm.parsed(LLM_SOURCES, "model.llm")
    for m, comp in cfg.model.token_reduction.items():
        comp.parsed(REDUCERS, f"model.token_reduction.{m}")
    cfg.model.embedding.pooling.parsed(POOLINGS, "model.embedding.pooling")
    if cfg.train is not None:
        for i, st in enumerate(cfg.train.stages):
            if st.eval_every and cfg.train.eval is None:
                raise ConfigError("there is no train.eval section to evaluate on", f"train.stages.{i}.eval_every")
            for j, src in enumerate(st.data):
                src.parsed(DATA_FORMATS, f"train.stages.{i}.data.{j}")
            for j, obj in enumerate(st.objectives):
                obj.parsed(OBJECTIVES, f"train.stages.{i}.objectives.{j}")
            for part in st.lora:
                if part != "llm" and part not in cfg.model.encoders:
                    raise ConfigError(
                        f"no part {part!r} to adapt; the parts are llm and the encoders "
                        f"({', '.join(cfg.model.encoders) or 'none'})",
                        f"train.stages.{i}.lora.{part}",
                    )
            check_data_kinds(st, f"train.stages.{i}")
        if cfg.train.eval is not None:
            for j, src in enumerate(cfg.train.eval.data):
                src.parsed(DATA_FORMATS, f"train.eval.data.{j}")


def check_data_kinds(st: StageConfig, where: str) -> None:
    """A stage's sources hold one kind of record (``SourceOptions.data_kind``: conversations or
    pairs) and every objective it lists trains on that kind (``Objective.data_kind``)."""
    formats: dict[str, list[str]] = {}
    for j, src in enumerate(st.data):
        kind = getattr(src.parsed(DATA_FORMATS, f"{where}.data.{j}"), "data_kind", "conversations")
        formats.setdefault(kind, []).append(src.format)
    if len(formats) > 1:
        mixed = " and ".join(f"{k} (format {', '.join(sorted(set(v)))})" for k, v in formats.items())
        raise ConfigError(f"the stage's sources mix {mixed}; a stage reads one kind of data", f"{where}.data")
    ((kind, fmts),) = formats.items()
    fmts = sorted(set(fmts))
    for obj in st.objectives:
        need = getattr(OBJECTIVES.get(obj.type).target, "data_kind", "conversations")
        if need != kind:
            readers = [n for n in OBJECTIVES.names() if getattr(OBJECTIVES.get(n).target, "data_kind", None) == kind]
            raise ConfigError(
                f"{obj.type} trains on {need}, but this stage's data is {kind} (format {', '.join(fmts)}); "
                f"on {kind} data list {' or '.join(readers) or 'an objective that reads it'}, and train "
                f"{obj.type} in a stage of its own",
                f"{where}.objectives",
            )


def parse_config(
    raw: dict, overrides: list[str] | tuple[str, ...] = (), variables: dict | None = None
) -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError("a pipeline config must be a mapping at the top level")
    raw = copy.deepcopy(raw)
    for ov in overrides:
        apply_override(raw, ov)
    name = raw.get("name", "mmlm")
    variables = {"out": f"runs/{name}", **(variables or {})}
    raw = _substitute(raw, variables)
    resolve_relative_paths(raw, None)  # zoo:NAME references
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError.from_validation(err) from None
    validate_components(cfg)
    return cfg


def load_config(
    path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), variables: dict | None = None
) -> PipelineConfig:
    """Read a pipeline YAML (a file path, or the name of a recipe in ``configs/``). Relative paths
    in it are read from the YAML file's folder (``--set`` values from the current folder, and paths
    under ``${out}`` from the run folder, as given)."""
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(err).split())}") from None
    if isinstance(raw, dict):
        resolve_relative_paths(raw, p.resolve().parent)
    return parse_config(raw, overrides, variables)


def raw_parts(raw: dict):
    """(key path, entry, registry, name key) of every registry-built part of a raw config, skipping
    what is malformed (the schema reports that)."""

    def items(node, where, registry, key):
        if isinstance(node, dict):
            node = node.items()
        elif isinstance(node, list):
            node = enumerate(node)
        else:
            return
        for k, entry in node:
            if isinstance(entry, dict):
                yield f"{where}.{k}", entry, registry, key

    model = raw.get("model")
    if isinstance(model, dict):
        yield from items(model.get("encoders"), "model.encoders", ENCODERS, "type")
        yield from items(model.get("connectors"), "model.connectors", CONNECTORS, "type")
        yield from items(model.get("token_reduction"), "model.token_reduction", REDUCERS, "type")
        if isinstance(model.get("llm"), dict):
            yield "model.llm", model["llm"], LLM_SOURCES, "type"
    train = raw.get("train")
    if isinstance(train, dict):
        stages = train.get("stages")
        for i, st in enumerate(stages if isinstance(stages, list) else []):
            if isinstance(st, dict):
                yield from items(st.get("data"), f"train.stages.{i}.data", DATA_FORMATS, "format")
                yield from items(st.get("objectives"), f"train.stages.{i}.objectives", OBJECTIVES, "type")
        if isinstance(train.get("eval"), dict):
            yield from items(train["eval"].get("data"), "train.eval.data", DATA_FORMATS, "format")


def path_keys(registry, name) -> dict[str, str]:
    """The options of part ``name`` that name files or folders, with their kind: ``file``, ``dir``,
    ``file_or_dir``, ``new_dir`` (created on first use) or ``local_or_hub`` (a folder or a hub id)."""
    if not isinstance(name, str) or name not in registry:
        return {}
    return dict(getattr(registry.get(name).options, "path_keys", {}))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_path(value: Any, kind: str, base: Path | None) -> Any:
    """``value`` read from ``base`` when it is a relative local path; ``zoo:NAME`` the zoo entry's
    verified local copy (``mmlm zoo download NAME`` fetches it; a config never does); URLs,
    ``pkg://``, variables and (for ``local_or_hub``) hub ids that are not folders under ``base`` are
    left as they are. ``base`` None: only zoo references are resolved."""
    if isinstance(value, str) and value.startswith("zoo:"):
        from mmlm.zoo.catalog import local_path

        try:
            return str(local_path(value[4:]))
        except (KeyError, FileNotFoundError, RuntimeError) as err:
            raise ConfigError(f"{value}: {err}") from None
    if base is None or not isinstance(value, str) or not value or "${" in value or "://" in value:
        return value
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    cand = base / p
    if kind == "local_or_hub" and not cand.exists() and _HUB_ID.match(value):
        return value
    return os.path.normpath(cand)


# keys of the schema itself (not of a part) that name files or folders, with their kind
SCHEMA_PATHS = {"train.init_from": "dir"}


def resolve_relative_paths(raw: dict, base: Path | None) -> None:
    """Make every relative path option of ``raw`` (in place) relative to ``base`` instead."""
    for dotted, kind in SCHEMA_PATHS.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = resolve_path(node[leaf], kind, base)
    for _, entry, registry, key in list(raw_parts(raw)):
        for dotted, kind in path_keys(registry, entry.get(key)).items():
            *parents, leaf = dotted.split(".")
            node = entry
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node:
                node[leaf] = resolve_path(node[leaf], kind, base)


def recipes_dir() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "recipes", here.parent / "configs"):
        if cand.is_dir():
            return cand
    return here / "recipes"


def resolve_config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for cand in (recipes_dir() / p.name, recipes_dir() / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {path}")
