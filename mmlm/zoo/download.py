"""Fetching zoo entries, verified: an https URL with its sha256 (resumable, the digest checked
before the file is used), or a hub repo at a pinned commit through ``huggingface_hub`` (its cache,
``HF_HUB_OFFLINE``, tokens), with each file's sha256 recorded in a lock file beside the cache and
checked on every later use. Offline (``offline=True`` or ``HF_HUB_OFFLINE=1``) nothing is fetched:
what is missing is named in the error."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed, was refused offline, or its bytes are not the ones pinned."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def offline_now(offline: bool = False) -> bool:
    return offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch_url(
    url: str,
    dest: Path,
    sha256: str,
    offline: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 60.0,
) -> Path:
    """``dest`` holding the bytes at ``url`` whose sha256 is ``sha256``. A complete ``dest`` is
    verified and kept; a partial download (``dest.part``) resumes with a Range request; a finished
    download whose digest differs is deleted and refused, so it is never used."""
    dest = Path(dest)
    if dest.is_file():
        got = sha256_of(dest)
        if got == sha256:
            return dest
        dest.unlink()  # corrupted or replaced since: fetch again (or refuse offline)
    if offline_now(offline):
        raise DownloadError(f"offline: {dest.name} is not downloaded (from {url}); run without --offline first")
    if (
        not url.startswith("https://")
        and not url.startswith("http://127.0.0.1")
        and not url.startswith("http://localhost")
    ):
        raise DownloadError(f"{url}: only https URLs are fetched")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if have and resp.status != 206:  # the server ignored the range: start over
                have = 0
            total = resp.headers.get("Content-Length")
            total = int(total) + have if total is not None else None
            with open(part, "ab" if have else "wb") as f:
                done = have
                while block := resp.read(CHUNK):
                    f.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            if total is not None and done < total:  # the connection closed early: keep the part
                raise DownloadError(
                    f"{url}: the download broke off at {done:,} of {total:,} bytes; run again to resume"
                )
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the part is already whole
            pass
        else:
            raise DownloadError(f"{url}: HTTP {err.code}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DownloadError(f"{url}: the download broke off ({err}); run again to resume") from None
    got = sha256_of(part)
    if got != sha256:
        part.unlink()
        raise DownloadError(f"{url}: sha256 {got} is not the pinned {sha256}; the file was deleted, not used")
    os.replace(part, dest)
    return dest


# ------------------------------------------------------------------------------------------ hub
def lock_file(cache_dir: Path | None) -> Path:
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = Path(constants.HF_HUB_CACHE)
    return Path(cache_dir) / "mmlm-zoo.lock.json"


def _read_lock(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def fetch_hub(
    repo: str,
    revision: str,
    patterns: list[str],
    cache_dir: Path | None = None,
    offline: bool = False,
) -> Path:
    """The snapshot folder of ``repo`` at commit ``revision`` holding the files matching
    ``patterns``. The first download records each file's sha256 in the lock file; every later call
    verifies the files against it (a changed file is an error, never silently used)."""
    from huggingface_hub import snapshot_download

    lock_path = lock_file(cache_dir)
    key = f"{repo}@{revision}"
    try:
        folder = Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=patterns,
                cache_dir=str(cache_dir) if cache_dir else None,
                local_files_only=offline_now(offline),
            )
        )
    except Exception as err:
        if offline_now(offline):
            raise DownloadError(
                f"offline: {repo} at {revision[:12]} is not in the cache ({patterns}); download it first "
                f"({type(err).__name__})"
            ) from None
        raise DownloadError(f"{repo} at {revision[:12]}: {err}") from None
    files = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and any(fnmatch.fnmatch(str(p.relative_to(folder)), pat) for pat in patterns)
    )
    lock = _read_lock(lock_path)
    pinned = lock.get(key)
    if pinned is None:
        if not files:
            raise DownloadError(f"{repo} at {revision[:12]}: no file matches {patterns}")
        lock[key] = {"repo": repo, "revision": revision, "files": {f: sha256_of(folder / f) for f in files}}
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path.write_text(json.dumps(lock, indent=2, sort_keys=True))
        return folder
    missing = sorted(set(pinned["files"]) - set(files))
    if missing:
        raise DownloadError(f"{repo} at {revision[:12]}: files of the lock are missing from the cache: {missing}")
    for f, digest in pinned["files"].items():
        got = sha256_of(folder / f)
        if got != digest:
            raise DownloadError(
                f"{repo} at {revision[:12]}: {f} has sha256 {got}, not {digest} as recorded in {lock_path}; "
                "the cache was changed: delete it and download again"
            )
    return folder
