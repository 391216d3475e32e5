"""What ``mmlm config validate`` checks beyond the schema (which ``load_config`` checks already):
the files and folders the config names exist, every part can be built (a timm or open_clip model
name, a transformers config) and every ``trainable``/``frozen``/``lr_groups`` pattern matches
parameters of the model, built as a skeleton on the meta device: no weights are read.

Each problem is one line, ``<key path>: <what>``, so that all of them are reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from mmlm.config import PipelineConfig, path_keys, resolve_path
from mmlm.registry import DATA_FORMATS, ENCODERS, LLM_SOURCES, OBJECTIVES
from mmlm.train.freeze import unmatched_message


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    parameters: int = 0  # tensors of the built skeleton (0 when it could not be built)
    trainable: dict[str, int] = field(default_factory=dict)  # stage -> tensors it trains


def _parts(cfg: PipelineConfig):
    for m, comp in cfg.model.encoders.items():
        yield f"model.encoders.{m}", comp, ENCODERS
    yield "model.llm", cfg.model.llm, LLM_SOURCES
    if cfg.train is not None:
        for i, st in enumerate(cfg.train.stages):
            for j, src in enumerate(st.data):
                yield f"train.stages.{i}.data.{j}", src, DATA_FORMATS
            for j, obj in enumerate(st.objectives):
                yield f"train.stages.{i}.objectives.{j}", obj, OBJECTIVES
        if cfg.train.eval is not None:
            for j, src in enumerate(cfg.train.eval.data):
                yield f"train.eval.data.{j}", src, DATA_FORMATS


def _value(options: dict, dotted: str):
    node = options
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_files(cfg: PipelineConfig) -> list[str]:
    """Every file or folder an option names exists (hub ids and folders made on first use aside)."""
    problems = []
    init = cfg.train.init_from if cfg.train else None
    if init and not (Path(init) / "mmlm.yaml").is_file():
        problems.append(f"train.init_from: no mmlm checkpoint (a folder with mmlm.yaml): {init}")
    for where, part, registry in _parts(cfg):
        for dotted, kind in path_keys(registry, part.name).items():
            value = _value(part.options(), dotted)
            if not isinstance(value, str) or not value:
                continue
            key = f"{where}.{dotted}"
            if value.startswith("pkg://") or kind == "new_dir":
                continue
            local = Path(resolve_path(value, kind, Path.cwd()))
            if kind == "local_or_hub" and not local.exists() and str(local) == value:
                continue  # a hub id: read from the hub (or its cache) when the model is built
            ok = {"file": local.is_file, "dir": local.is_dir}.get(kind, local.exists)()
            if not ok:
                what = {"file": "file", "dir": "folder"}.get(kind, "file or folder")
                problems.append(f"{key}: no such {what}: {local}")
    return problems


def _matches(names: list[str], pattern: str) -> bool:
    return any(fnmatchcase(n, pattern) for n in names)


def check_patterns(cfg: PipelineConfig, names: list[str]) -> tuple[list[str], dict[str, int]]:
    """Each stage's trainable set is not empty and each of its patterns matches some parameter."""
    problems, trainable = [], {}
    for i, st in enumerate(cfg.train.stages if cfg.train else []):
        where = f"train.stages.{i}"
        for key, patterns in (("trainable", st.trainable), ("frozen", st.frozen), ("lr_groups", list(st.lr_groups))):
            for pattern in patterns:
                if not _matches(names, pattern):
                    problems.append(f"{where}.{key}: {pattern!r} matches no parameter")
        chosen = [n for n in names if any(fnmatchcase(n, p) for p in st.trainable)]
        chosen = [n for n in chosen if not any(fnmatchcase(n, p) for p in st.frozen)]
        if not chosen:
            problems.append(f"{where}.trainable: {unmatched_message(st.trainable, st.frozen, names)}")
        trainable[st.name] = len(chosen)
    return problems, trainable


def check_config(cfg: PipelineConfig) -> Report:
    """Everything ``mmlm config validate`` reports about a config that passed the schema."""
    from mmlm.errors import CheckpointError, ConfigError
    from mmlm.model import skeleton

    report = Report(problems=check_files(cfg))
    try:
        model = skeleton(cfg)
    except (ConfigError, CheckpointError, ValueError, OSError, ImportError, RuntimeError) as err:
        text = " ".join(str(err).split())
        text = text if text.startswith(("model.", "train.")) else f"model: cannot be built: {text}"
        if not any(text.startswith(p.split(": ", 1)[0] + ":") for p in report.problems):  # said already
            report.problems.append(text)
        return report
    names = [n for n, _ in model.named_parameters()]
    report.parameters = len(names)
    problems, report.trainable = check_patterns(cfg, names)
    report.problems += problems
    return report
