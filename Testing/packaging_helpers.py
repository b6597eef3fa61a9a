"""Shared parts of the model packaging tests (test_catalog_download.py, test_model_install.py): an
isolated user model folder, a local HTTP server, a tiny but real model package and catalog entries."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from CascadeSegLib.network import NetConfig, build_network

REPO_RESOURCES = Path(__file__).resolve().parent.parent / "Resources"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True, name="_isolated_models")
def isolated_models_fixture(tmp_path: Path, monkeypatch) -> Path:
    """Never touch ~/.cascadeseg: installed models go to a temporary folder."""
    d = tmp_path / "user_models"
    monkeypatch.setenv("CASCADESEG_MODELS", str(d))
    return d


# --------------------------------------------------------------------------- HTTP test server

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv: _Server = self.server  # type: ignore[assignment]
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if rng and srv.honour_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if srv.drop_after:
            # Send part of the body, then hang up: the client sees a truncated download.
            n = srv.drop_after.pop(0)
            self.wfile.write(payload[:n])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: list[int] = []
        self.honour_range = True

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(name="server")
def server_fixture():
    srv = _Server()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


# --------------------------------------------------------------------------- tiny model package

def make_package(folder: Path, name: str = "tiny-organs", version: str = "1.0.0",
                 seed: int = 0) -> Path:
    """A valid two-stage package (model.json as in docs/architecture.md + real weights)."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    cfg = NetConfig(kind="padded", base_channels=4, depth=2, num_classes=3)
    stages = []
    for i, spacing in ((1, [6.0, 6.0, 6.0]), (2, [2.0, 2.0, 2.0])):
        fname = f"stage{i}.pt"
        torch.save(build_network(cfg).state_dict(), folder / fname)
        stages.append({"name": f"stage{i}", "spacing": spacing, "tile": [32, 32, 32],
                       "network": cfg.to_json(), "weights": fname,
                       "sha256": sha((folder / fname).read_bytes())})
    meta = {
        "format_version": 1, "name": name, "version": version,
        "description": "test package", "license": "Apache-2.0",
        "labels": [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"}],
        "intensity": {"window": [-200, 300], "normalization": "window01"},
        "body_mask": {"threshold_hu": -500}, "dilation_radius": 3, "stages": stages,
        "provenance": {"trained_on": "nothing (random weights)"},
    }
    (folder / "model.json").write_text(json.dumps(meta, indent=2))
    return folder




def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()



def _entry(**kw) -> dict:
    e = {"name": "m", "version": "1.2.3", "description": "d", "labels": ["liver"],
         "license": "Apache-2.0", "url": "https://example.org/m.zip", "sha256": "a" * 64,
         "size_bytes": 10, "bundled": False}
    e.update(kw)
    return e

