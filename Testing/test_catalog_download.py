"""Catalog validation, resumable sha256-checked downloads from a local HTTP server, and model
installation / `cascadeseg models` commands against a tiny but real model package."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from CascadeSegLib import resources
from CascadeSegLib.commands import models as models_cmd
from CascadeSegLib.errors import ModelError
from CascadeSegLib.network import NetConfig, build_network
from CascadeSegLib.packaging.archive import make_zip
from CascadeSegLib.packaging.catalog import Catalog, installed_models, load_catalog, parse_catalog
from CascadeSegLib.packaging.download import download, install_model

REPO_RESOURCES = Path(__file__).resolve().parent.parent / "Resources"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _isolated_models(tmp_path: Path, monkeypatch) -> Path:
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


@pytest.fixture
def server():
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


@pytest.fixture(scope="module")
def package_zip(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pkg")
    return make_zip(make_package(d / "tiny-organs"), d / "tiny-organs-1.0.0.zip",
                    prefix="tiny-organs")


def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


# --------------------------------------------------------------------------- catalog

def test_repository_catalog_has_bundled_demo() -> None:
    cat = load_catalog()
    entry = cat.get("abdomen-ct-demo")
    assert (entry.version, entry.bundled, entry.url, entry.sha256) == ("1.0.0", True, None, None)
    assert entry.labels[0] == "liver" and len(set(entry.labels)) == len(entry.labels)
    assert cat.path == REPO_RESOURCES / "Models.json"
    with pytest.raises(ModelError, match="not in the catalog .*abdomen-ct-demo"):
        cat.get("no-such-model")


def _entry(**kw) -> dict:
    e = {"name": "m", "version": "1.2.3", "description": "d", "labels": ["liver"],
         "license": "Apache-2.0", "url": "https://example.org/m.zip", "sha256": "a" * 64,
         "size_bytes": 10, "bundled": False}
    e.update(kw)
    return e


@pytest.mark.parametrize("data, words", [
    ({"format_version": 2, "models": []}, "format_version: must be 1"),
    ({"models": []}, "missing required key 'format_version'"),
    ({"format_version": 1, "models": [_entry(sha256="ABC")]}, "models[0].sha256"),
    ({"format_version": 1, "models": [_entry(url="http://example.org/m.zip")]}, "models[0].url"),
    ({"format_version": 1, "models": [_entry(url="ftp://example.org/m.zip")]}, "models[0].url"),
    ({"format_version": 1, "models": [_entry(bundled="yes")]}, "models[0].bundled: must be boolean"),
    ({"format_version": 1, "models": [_entry(size_bytes=True)]}, "models[0].size_bytes"),
    ({"format_version": 1, "models": [_entry(size_bytes=-1)]}, "models[0].size_bytes: must be >= 0"),
    ({"format_version": 1, "models": [_entry(labels=[])]}, "models[0].labels: needs at least 1"),
    ({"format_version": 1, "models": [_entry(name="../x")]}, "models[0].name"),
    ({"format_version": 1, "models": [_entry(version="1.0")]}, "models[0].version"),
    ({"format_version": 1, "models": [_entry(), _entry(extra=1)]}, "models[1]: unknown key(s) ['extra']"),
    ({"format_version": 1, "models": [{k: v for k, v in _entry().items() if k != "license"}]},
     "models[0]: missing required key 'license'"),
    ({"format_version": 1, "models": [_entry(), _entry()]}, "listed twice"),
    ({"format_version": 1, "models": [_entry(url=None)]}, "needs a url and a sha256"),
])
def test_catalog_validation_names_the_problem(data: dict, words: str) -> None:
    with pytest.raises(ModelError) as ei:
        parse_catalog(data, "cat.json")
    msg = str(ei.value)
    assert msg.startswith("cat.json: ") and words in msg and "\n" not in msg


def test_valid_catalog_round_trips(tmp_path: Path) -> None:
    data = {"format_version": 1, "models": [_entry(), _entry(name="b", url=None, sha256=None,
                                                             size_bytes=None, bundled=True)]}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    cat = load_catalog(p)
    assert isinstance(cat, Catalog) and cat.names == ["m", "b"] and "b" in cat
    assert [e.to_json() for e in cat] == data["models"]
    p.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_catalog(p)
    with pytest.raises(ModelError, match="does not exist"):
        load_catalog(tmp_path / "missing.json")


def test_installed_models_scans_both_folders(tmp_path: Path, _isolated_models: Path) -> None:
    make_package(_isolated_models / "tiny-organs")
    (_isolated_models / ".downloads").mkdir()
    (_isolated_models / "not-a-model").mkdir()
    bundled = tmp_path / "bundled"
    make_package(bundled / "demo", name="demo", version="0.1.0")
    found = installed_models(bundled_root=bundled)
    assert [(m.name, m.version, m.source, m.labels, m.path) for m in found] == [
        ("tiny-organs", "1.0.0", "installed", ("liver", "spleen"), _isolated_models / "tiny-organs"),
        ("demo", "0.1.0", "bundled", ("liver", "spleen"), bundled / "demo")]
    assert installed_models(tmp_path / "nowhere", tmp_path / "nowhere") == []


# --------------------------------------------------------------------------- download

def test_download_checks_sha_and_reports_progress(server: _Server, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    server.files["/m.zip"] = data
    seen: list[tuple[int, int | None]] = []
    out = download(server.url("/m.zip"), tmp_path / "m.zip", sha(data),
                   progress=lambda d, t: seen.append((d, t)))
    assert out.read_bytes() == data
    assert seen[0] == (0, 200_000) and seen[-1] == (200_000, 200_000)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert not (tmp_path / "m.zip.part").exists()
    # Already there with the right sha256: no second request.
    download(server.url("/m.zip"), tmp_path / "m.zip", sha(data))
    assert len(server.requests) == 1


def test_dropped_connection_resumes_with_range(server: _Server, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    server.files["/big.zip"] = data
    server.drop_after = [120_000]
    dest = tmp_path / "dl" / "big.zip"
    part = dest.with_name("big.zip.part")
    with pytest.raises(ModelError, match="run the same command again to resume") as ei:
        download(server.url("/big.zip"), dest, sha(data))
    assert "\n" not in str(ei.value)
    assert part.stat().st_size == 120_000 and part.read_bytes() == data[:120_000]
    assert not dest.exists()
    seen: list[int] = []
    download(server.url("/big.zip"), dest, sha(data), progress=lambda d, t: seen.append(d))
    assert server.requests == [("/big.zip", None), ("/big.zip", "bytes=120000-")]
    assert seen[0] == 120_000 and seen[-1] == 300_000
    assert sha(dest.read_bytes()) == sha(data)
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server: _Server, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    server.files["/m.zip"] = data
    server.honour_range = False
    dest = tmp_path / "m.zip"
    dest.with_name("m.zip.part").write_bytes(b"stale bytes from another file")
    download(server.url("/m.zip"), dest, sha(data))
    assert server.requests == [("/m.zip", "bytes=29-")]
    assert dest.read_bytes() == data


def test_part_longer_than_file_restarts(server: _Server, tmp_path: Path) -> None:
    data = os.urandom(1000)
    server.files["/m.zip"] = data
    dest = tmp_path / "m.zip"
    dest.with_name("m.zip.part").write_bytes(os.urandom(5000))
    download(server.url("/m.zip"), dest, sha(data))
    assert server.requests == [("/m.zip", "bytes=5000-"), ("/m.zip", None)]
    assert dest.read_bytes() == data


def test_wrong_sha_deletes_the_part(server: _Server, tmp_path: Path) -> None:
    server.files["/m.zip"] = os.urandom(10_000)
    with pytest.raises(ModelError, match="expected 0{64}; the file was deleted"):
        download(server.url("/m.zip"), tmp_path / "m.zip", "0" * 64)
    assert _tree(tmp_path) == set()
    with pytest.raises(ModelError, match="not a sha256"):
        download(server.url("/m.zip"), tmp_path / "m.zip", "xyz")


@pytest.mark.parametrize("url", ["http://example.com/m.zip", "http://10.1.2.3/m.zip",
                                 "ftp://example.com/m.zip", "gopher://x/y", "data:,abc"])
def test_insecure_or_unknown_urls_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ModelError, match="refusing to download") as ei:
        download(url, tmp_path / "m.zip", None)
    assert "\n" not in str(ei.value)
    assert _tree(tmp_path) == set()


def test_redirect_to_plain_http_host_refused(server: _Server, tmp_path: Path) -> None:
    server.redirects["/r.zip"] = "http://example.com/m.zip"
    with pytest.raises(ModelError, match="plain http"):
        download(server.url("/r.zip"), tmp_path / "m.zip", None)
    assert not (tmp_path / "m.zip").exists()


def test_http_errors_are_one_line(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"HTTP 404"):
        download(server.url("/missing.zip"), tmp_path / "m.zip", None)


def test_local_path_and_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = os.urandom(3000)
    src.write_bytes(data)
    assert download(str(src), tmp_path / "a.bin", sha(data)).read_bytes() == data
    assert download(src.as_uri(), tmp_path / "b.bin", sha(data)).read_bytes() == data
    with pytest.raises(ModelError, match="sha256"):
        download(src.as_uri(), tmp_path / "c.bin", "1" * 64)
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()


# --------------------------------------------------------------------------- install

def test_install_from_url(server: _Server, package_zip: Path, _isolated_models: Path) -> None:
    from CascadeSegLib.packaging.model import ModelPackage

    blob = package_zip.read_bytes()
    server.files["/tiny.zip"] = blob
    path = install_model(server.url("/tiny.zip"), sha256=sha(blob))
    assert path == _isolated_models / "tiny-organs"
    pkg = ModelPackage.load(path)
    assert (pkg.name, pkg.version, pkg.labels.names) == ("tiny-organs", "1.0.0", ["liver", "spleen"])
    pkg.verify()
    net = pkg.load_network(0)
    assert net(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
    # Only the model folder and an empty .downloads remain.
    assert sorted(p.name for p in _isolated_models.iterdir()) == [".downloads", "tiny-organs"]
    assert list((_isolated_models / ".downloads").iterdir()) == []
    assert _tree(path) == {"model.json", "stage1.pt", "stage2.pt"}


def test_install_wrong_sha_leaves_nothing(server: _Server, package_zip: Path,
                                          _isolated_models: Path) -> None:
    server.files["/tiny.zip"] = package_zip.read_bytes()
    with pytest.raises(ModelError, match="sha256"):
        install_model(server.url("/tiny.zip"), sha256="f" * 64)
    assert _tree(_isolated_models) == {".downloads"}


def test_install_remote_http_refused_before_anything(_isolated_models: Path) -> None:
    with pytest.raises(ModelError, match="plain http"):
        install_model("http://example.com/tiny.zip")
    assert not _isolated_models.exists()


def test_install_local_zip_overwrite_and_upgrade(tmp_path: Path, package_zip: Path) -> None:
    models = tmp_path / "m"
    p = install_model(package_zip, models_dir=models)
    first = (p / "stage1.pt").read_bytes()
    with pytest.raises(ModelError, match="already installed.*--overwrite"):
        install_model(package_zip, models_dir=models)
    assert (p / "stage1.pt").read_bytes() == first
    assert install_model(str(package_zip), models_dir=models, overwrite=True,
                         sha256=sha(package_zip.read_bytes())) == p
    # A new version replaces the old one without --overwrite.
    newer = make_package(tmp_path / "v2" / "tiny-organs", version="1.1.0", seed=1)
    z2 = make_zip(newer, tmp_path / "v2.zip")
    assert install_model(z2, models_dir=models) == p
    assert json.loads((p / "model.json").read_text(encoding="utf-8"))["version"] == "1.1.0"
    assert (p / "stage1.pt").read_bytes() == (newer / "stage1.pt").read_bytes() != first
    assert sorted(x.name for x in models.iterdir()) == ["tiny-organs"]


def test_install_refuses_damaged_weights(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "bad" / "tiny-organs")
    with open(pkg / "stage2.pt", "r+b") as fh:
        fh.seek(-10, os.SEEK_END)
        fh.write(b"0123456789")
    z = make_zip(pkg, tmp_path / "bad.zip")
    models = tmp_path / "m"
    with pytest.raises(ModelError, match="stage2.pt has sha256"):
        install_model(z, models_dir=models)
    assert _tree(models) == set()


def _catalog_resources(tmp_path: Path, monkeypatch, entry: dict) -> Path:
    res = tmp_path / "res"
    res.mkdir()
    for f in ("Models.schema.json", "labels.json"):
        shutil.copy(REPO_RESOURCES / f, res / f)
    (res / "Models.json").write_text(json.dumps({"format_version": 1, "models": [entry]}))
    monkeypatch.setenv("CASCADESEG_RESOURCES", str(res))
    return res


def test_install_by_catalog_name(server: _Server, package_zip: Path, tmp_path: Path,
                                 monkeypatch, _isolated_models: Path) -> None:
    blob = package_zip.read_bytes()
    server.files["/tiny.zip"] = blob
    _catalog_resources(tmp_path, monkeypatch, _entry(
        name="tiny-organs", version="1.0.0", labels=["liver", "spleen"],
        url=server.url("/tiny.zip"), sha256=sha(blob), size_bytes=len(blob)))
    with pytest.raises(ModelError, match="differs from the catalog"):
        install_model("tiny-organs", sha256="0" * 64)
    assert server.requests == []
    assert install_model("tiny-organs") == _isolated_models / "tiny-organs"
    with pytest.raises(ModelError, match="not in the catalog"):
        install_model("other-model")


def test_install_catalog_sha_mismatch_and_name_mismatch(server: _Server, package_zip: Path,
                                                        tmp_path: Path, monkeypatch,
                                                        _isolated_models: Path) -> None:
    blob = package_zip.read_bytes()
    server.files["/tiny.zip"] = blob
    _catalog_resources(tmp_path, monkeypatch, _entry(
        name="tiny-organs", version="2.0.0", url=server.url("/tiny.zip"), sha256=sha(blob)))
    with pytest.raises(ModelError, match="contains tiny-organs 1.0.0"):
        install_model("tiny-organs")
    assert _tree(_isolated_models) == {".downloads"}


def test_install_bundled_catalog_name_returns_bundled_folder(tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    res = _catalog_resources(tmp_path, monkeypatch, _entry(
        name="demo", version="1.0.0", url=None, sha256=None, bundled=True))
    make_package(res / "Models" / "demo", name="demo")
    assert install_model("demo") == res / "Models" / "demo"
    assert _run(["models", "install", "demo"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"demo 1.0.0 is bundled with CascadeSeg in {res / 'Models' / 'demo'}; nothing to install")
    shutil.rmtree(res / "Models" / "demo")
    with pytest.raises(ModelError, match="not bundled"):
        install_model("demo")


# --------------------------------------------------------------------------- commands

def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cascadeseg")
    models_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_models_commands(server: _Server, package_zip: Path, tmp_path: Path, capsys,
                         _isolated_models: Path) -> None:
    blob = package_zip.read_bytes()
    server.files["/tiny.zip"] = blob
    assert _run(["models", "install", server.url("/tiny.zip"), "--sha256", sha(blob)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"installed tiny-organs 1.0.0 in {_isolated_models / 'tiny-organs'}"
    assert "download" in err  # the tqdm bar goes to stderr

    assert _run(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "SOURCE", "LABELS", "INSTALLED"]
    rows = {tuple(line.split()) for line in lines[1:]}
    assert ("tiny-organs", "1.0.0", "installed", "2", "yes") in rows
    demo = load_catalog().get("abdomen-ct-demo")
    demo_installed = (resources.bundled_models_dir() / "abdomen-ct-demo" / "model.json").is_file()
    assert ("abdomen-ct-demo", demo.version, "bundled" if demo_installed else "catalog",
            str(len(demo.labels)), "yes" if demo_installed else "no") in rows

    assert _run(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"name": "tiny-organs", "version": "1.0.0", "source": "installed", "labels": 2,
            "installed": True} .items() <= listed[0].items()

    assert _run(["models", "verify", "tiny-organs"]) == 0
    out = capsys.readouterr().out.splitlines()
    installed = _isolated_models / "tiny-organs"
    assert out[0].startswith("OK tiny-organs 1.0.0")
    assert out[1:] == [f"  stage{i}.pt  sha256 {sha((installed / f'stage{i}.pt').read_bytes())}"
                       for i in (1, 2)]
    (installed / "stage1.pt").write_bytes(b"tampered")
    with pytest.raises(ModelError, match="stage1.pt"):
        _run(["models", "verify", str(installed)])


def test_models_install_needs_source() -> None:
    with pytest.raises(SystemExit) as ei:
        _run(["models", "install"])
    assert ei.value.code == 2


def test_cli_dispatch_reports_refusal_in_one_line(capsys, _isolated_models: Path) -> None:
    from CascadeSegLib.cli import main

    assert main(["models", "install", "http://example.com/tiny.zip"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cascadeseg: error: refusing to download http://example.com/tiny.zip")
    assert err.count("\n") == 1
    assert main(["models"]) == 2  # a sub-command is required
    assert not _isolated_models.exists()
