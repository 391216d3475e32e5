"""The zoo: the catalog validates (each recipe's config too), URL downloads from a real HTTP server on
a loopback port resume after a broken transfer and refuse bytes whose digest is not the pinned one,
offline mode names what is missing, and a hub-style cache is verified against the lock file."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest

from mmlm.zoo.catalog import Catalog, Entry, load_catalog, project_root
from mmlm.zoo.download import DownloadError, fetch_hub, fetch_url

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Files(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file (honouring Range), a broken transfer at /broken (the first time it
    sends half and drops the connection), other bytes at /wrong; records each request's Range."""

    ranges: list = []
    broken_once = {"done": False}

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = b"x" * len(PAYLOAD) if self.path == "/wrong" else PAYLOAD
        rng = self.headers.get("Range")
        Files.ranges.append((self.path, rng))
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/broken" and not Files.broken_once["done"]:
            Files.broken_once["done"] = True
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the transfer breaks off half way
            return
        self.wfile.write(body)


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # other test modules set it for the process
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    Files.ranges = []
    Files.broken_once["done"] = False
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_a_broken_transfer_resumes_where_it_stopped(server, tmp_path):
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError, match="resume"):
        fetch_url(server + "/broken", dest, DIGEST)
    part = tmp_path / "w.bin.part"
    assert 0 < part.stat().st_size < len(PAYLOAD) and not dest.exists()
    got = fetch_url(server + "/broken", dest, DIGEST)
    assert got.read_bytes() == PAYLOAD and not part.exists()
    assert Files.ranges[-1] == ("/broken", f"bytes={len(PAYLOAD) // 2}-")  # asked only for the rest
    n = len(Files.ranges)
    assert fetch_url(server + "/broken", dest, DIGEST) == dest and len(Files.ranges) == n  # verified, not fetched


def test_bytes_that_are_not_the_pinned_ones_are_deleted_and_never_used(server, tmp_path):
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError, match="not the pinned"):
        fetch_url(server + "/wrong", dest, DIGEST)
    assert not dest.exists() and not (tmp_path / "w.bin.part").exists()
    dest.write_bytes(PAYLOAD[:-1] + b"\x00")  # a file corrupted on disk after its download
    assert fetch_url(server + "/file", dest, DIGEST).read_bytes() == PAYLOAD


def test_offline_names_the_missing_file_and_contacts_nobody(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline: w.bin is not downloaded"):
        fetch_url(server + "/file", tmp_path / "w.bin", DIGEST)
    assert Files.ranges == []


def _hub_cache(root, repo, commit, files: dict[str, bytes]):
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (root / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    return snap


def test_a_hub_cache_loads_offline_and_is_verified_against_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _hub_cache(tmp_path, "org/tiny", commit, {"config.json": b"{}", "model.safetensors": b"weights"})
    got = fetch_hub("org/tiny", commit, ["*.json", "*.safetensors"], cache_dir=tmp_path)
    assert got == snap
    lock = (tmp_path / "mmlm-zoo.lock.json").read_text()
    assert hashlib.sha256(b"weights").hexdigest() in lock and commit in lock
    assert fetch_hub("org/tiny", commit, ["*.json", "*.safetensors"], cache_dir=tmp_path) == snap
    (snap / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="model.safetensors has sha256"):
        fetch_hub("org/tiny", commit, ["*.json", "*.safetensors"], cache_dir=tmp_path)
    with pytest.raises(DownloadError, match="offline: org/other"):
        fetch_hub("org/other", commit, ["*.json"], cache_dir=tmp_path)


def test_every_catalog_entry_validates_and_so_does_its_config():
    from mmlm.config import load_config

    cat = load_catalog()
    assert cat.entries
    for name, e in cat.entries.items():
        if e.config:
            load_config(str(project_root() / e.config), variables={"out": "runs/x"})  # raises on a bad config
        if e.source.path:
            assert (project_root() / e.source.path).exists(), name


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"hub": "org/m", "revision": "main"}, "full 40-character commit"),
        ({"hub": "org/m", "revision": "0123456"}, "full 40-character commit"),
        ({"url": "http://x.org/f.bin", "sha256": "0" * 64}, "https"),
        ({"url": "https://x.org/f.bin"}, "sha256"),
        ({"hub": "org/m", "url": "https://x"}, "exactly one"),
    ],
)
def test_the_schema_refuses_unpinned_sources(source, message):
    with pytest.raises(ValueError, match=message):
        Entry(kind="model", description="d", source=source, size="1 GB", license="mit")


def test_a_config_names_a_zoo_entry_and_an_unknown_one_is_a_config_error():
    from mmlm.config import parse_config, resolve_path
    from mmlm.errors import ConfigError

    assert resolve_path("zoo:shapes-tiny", "local_or_hub", None) == str(project_root() / "configs/shapes-tiny.yaml")
    with pytest.raises(ConfigError, match="no zoo entry 'nope'"):
        parse_config({"model": {"encoders": {}, "connectors": {}, "llm": {"type": "hf", "path": "zoo:nope"}}})
    assert isinstance(load_catalog(), Catalog) and os.path.isfile(project_root() / "mmlm/zoo/catalog.yaml")
