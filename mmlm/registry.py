"""Exact-name registries of the parts a pipeline YAML names: encoders, connectors, LLM sources, data
formats and training objectives.

Each entry is a class (or a loader function) registered with the pydantic model of its options::

    @CONNECTORS.register("mlp", options=MLPOptions)
    class MLPConnector(Connector):
        def __init__(self, opts: MLPOptions, in_dim, out_dim, llm=None): ...

``parse`` checks a YAML entry's options against that model once (``config.py`` does it for the
whole config, so every mistake surfaces with its key path before anything is built) and ``create``
calls the part with the parsed, typed options. ``example`` is a small working set of options, used
by the contract tests that run over every registered part.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from mmlm.errors import ConfigError, UnknownComponentError


@dataclass(frozen=True)
class Entry:
    name: str
    target: Callable[..., Any]  # the class (or loader) called with the parsed options
    options: type[BaseModel]
    summary: str
    example: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Name -> part. Lookup is by exact name only: no aliases, no case folding."""

    def __init__(self, kind: str, packages: tuple[str, ...] = (), moved: dict[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._moved = dict(moved or {})  # names that were parts here once -> where they went
        # every module of these packages is imported on first lookup, so a new part is one new
        # file with its ``@REGISTRY.register`` line and no edit anywhere else
        self._packages = packages
        self._loaded = False

    def register(self, name: str, options: type[BaseModel], summary: str = "", example: dict | None = None):
        def deco(target):
            if name in self._entries and self._entries[name].target is not target:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            text = summary or next(iter((target.__doc__ or "").strip().splitlines()), "")
            self._entries[name] = Entry(name, target, options, text, dict(example or {}))
            return target

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for pkg_name in self._packages:
            pkg = importlib.import_module(pkg_name)
            if hasattr(pkg, "__path__"):
                for info in pkgutil.iter_modules(pkg.__path__):
                    if not info.name.startswith("_"):
                        importlib.import_module(f"{pkg_name}.{info.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        self._load()
        return [self._entries[n] for n in sorted(self._entries)]

    def get(self, name: str, where: str = "") -> Entry:
        self._load()
        if name not in self._entries:
            loc = f"{where}: " if where else ""
            raise UnknownComponentError(f"{loc}{self.unknown(name)}")
        return self._entries[name]

    def unknown(self, name: str) -> str:
        text = f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
        return f"{text}. {self._moved[name]}" if name in self._moved else text

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def parse(self, name: str, options: dict[str, Any], where: str, key: str = "type") -> BaseModel:
        """Typed options of part ``name``; any error is a ConfigError naming its key path under ``where``."""
        try:
            entry = self.get(name)
        except UnknownComponentError:
            raise ConfigError(self.unknown(name), f"{where}.{key}") from None
        try:
            return entry.options.model_validate(options)
        except ValidationError as err:
            fields = [f.alias or n for n, f in entry.options.model_fields.items()]
            raise ConfigError.from_validation(err, where, fields) from None

    def create(self, component, *args, where: str, **kwargs):
        """Build the part a config entry names (``type``/``format`` plus options), with the options
        parsed once at validation (parsed here when the entry was never validated)."""
        entry = self.get(component.name, where=f"{where}.{component.name_key}")
        return entry.target(component.parsed(self, where), *args, **kwargs)


ENCODERS = Registry("encoder", packages=("mmlm.vision", "mmlm.audio", "mmlm.video"))
CONNECTORS = Registry(
    "connector",
    packages=("mmlm.connectors",),
    moved={
        "sea": "SEA is a training objective now: make the connector its inner one and list "
        "{type: sea, ...} in each stage's objectives (checkpoints saved with it are migrated on load)"
    },
)
LLM_SOURCES = Registry("llm source", packages=("mmlm.llm",))
DATA_FORMATS = Registry("data format", packages=("mmlm.data.sources", "mmlm.data.pairs"))
OBJECTIVES = Registry("objective", packages=("mmlm.objectives",))
POOLINGS = Registry("pooling", packages=("mmlm.embed.pooling",))
REDUCERS = Registry("reducer", packages=("mmlm.reduce",))

ALL = {
    "encoders": ENCODERS,
    "connectors": CONNECTORS,
    "llm sources": LLM_SOURCES,
    "data formats": DATA_FORMATS,
    "objectives": OBJECTIVES,
    "poolings": POOLINGS,
    "reducers": REDUCERS,
}
