"""Exact-name registries for the parts a pipeline YAML names (encoders, connectors, LLM sources).

A registry maps a name to a builder and, optionally, a pydantic model of the options that builder
accepts. ``config.py`` validates each component's options against that model so that a wrong option
fails with its full key path before anything is built.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel


class UnknownComponentError(KeyError):
    """An exact-name lookup failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    options: type[BaseModel] | None
    summary: str


class Registry:
    """Name -> builder. Lookup is by exact name only: no aliases, no case folding."""

    def __init__(self, kind: str, packages: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        # every module of these packages is imported on first lookup, so a new part is one new
        # file with its ``@REGISTRY.register`` line and no edit anywhere else
        self._packages = packages
        self._loaded = False

    def register(self, name: str, options: type[BaseModel] | None = None, summary: str = ""):
        def deco(builder):
            if name in self._entries and self._entries[name].builder is not builder:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            text = summary or next(iter((builder.__doc__ or "").strip().splitlines()), "")
            self._entries[name] = Entry(name, builder, options, text)
            return builder

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
            raise UnknownComponentError(
                f"{loc}unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            )
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


ENCODERS = Registry("encoder", packages=("mmlm.vision", "mmlm.audio"))
CONNECTORS = Registry("connector", packages=("mmlm.connectors",))
LLM_SOURCES = Registry("llm source", packages=("mmlm.llm",))
DATA_FORMATS = Registry("data format", packages=("mmlm.data.sources",))

ALL = {"encoders": ENCODERS, "connectors": CONNECTORS, "llm sources": LLM_SOURCES, "data formats": DATA_FORMATS}
