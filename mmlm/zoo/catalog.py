"""The zoo's catalog (``catalog.yaml`` beside this file), validated by the schema below, and
``zoo:NAME`` references: a config may name an entry wherever a path or hub id goes."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CATALOG = Path(__file__).with_name("catalog.yaml")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hub: str | None = None  # a hub repo id, with revision: a full 40-character commit
    revision: str | None = None
    url: str | None = None  # an https URL, with sha256: the file's digest
    sha256: str | None = None
    path: str | None = None  # a file or folder of mmlm's own (relative to the project root)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("hub", "url", "path") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hub, url or path (given: {given or 'none'})")
        if self.hub and not (self.revision and COMMIT.match(self.revision)):
            raise ValueError(
                f"hub source {self.hub}: revision must be a full 40-character commit, not {self.revision!r}"
            )
        if self.url and not (self.url.startswith("https://") and self.sha256 and SHA256.match(self.sha256)):
            raise ValueError(f"url source {self.url}: needs https and a 64-hex sha256")
        return self


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["model", "tower", "llm", "recipe"]
    description: str
    source: Source
    files: list[str] = Field(default_factory=lambda: ["*"])  # allow patterns (hub) / the file name (url)
    size: str
    license: str
    research_only: bool = False  # shown and flagged before a download
    needs_import: Literal["llava"] | None = None  # a transformers Llava: `mmlm import` after download
    config: str | None = None  # the mmlm config that uses it


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entries: dict[str, Entry]


@lru_cache(maxsize=4)
def load_catalog(path: Path = CATALOG) -> Catalog:
    try:
        return Catalog(**yaml.safe_load(Path(path).read_text()))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"{path}: {where}: {first['msg']}") from None


def entry(name: str) -> Entry:
    cat = load_catalog()
    if name not in cat.entries:
        raise KeyError(f"no zoo entry {name!r}; known: {', '.join(sorted(cat.entries))}")
    return cat.entries[name]


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def local_path(name: str, cache_dir: Path | None = None, offline: bool = True) -> Path:
    """Where entry ``name`` is on this machine: its own file for path sources, the verified
    download otherwise (offline by default: a config never fetches; `mmlm zoo download` does)."""
    from mmlm.zoo.download import fetch_hub, fetch_url

    e = entry(name)
    src = e.source
    if src.path:
        p = project_root() / src.path
        if not p.exists():
            raise FileNotFoundError(f"zoo entry {name}: {p} is not in this installation")
        return p
    if src.hub:
        return fetch_hub(src.hub, src.revision, e.files, cache_dir, offline=offline)
    dest = (cache_dir or default_cache()) / name / (e.files[0] if e.files != ["*"] else Path(src.url).name)
    return fetch_url(src.url, dest, src.sha256, offline=offline)


def default_cache() -> Path:
    import os

    return Path(os.environ.get("MMLM_ZOO_CACHE", Path.home() / ".cache" / "mmlm" / "zoo"))
