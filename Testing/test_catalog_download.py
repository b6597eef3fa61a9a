"""The model catalog's validation and resumable sha256-checked downloads from a local HTTP server.
Installing models and the `cascadeseg models` commands are in test_model_install.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from packaging_helpers import REPO_RESOURCES, _entry, _Server, _tree, make_package, sha

# the fixtures _isolated_models (autouse) and server, imported so that pytest finds them here
from packaging_helpers import isolated_models_fixture as isolated_models_fixture
from packaging_helpers import server_fixture as server_fixture

from CascadeSegLib.errors import ModelError
from CascadeSegLib.packaging.catalog import Catalog, installed_models, load_catalog, parse_catalog
from CascadeSegLib.packaging.download import download

# --------------------------------------------------------------------------- catalog

def test_repository_catalog_has_bundled_demo() -> None:
    cat = load_catalog()
    entry = cat.get("abdomen-ct-demo")
    assert (entry.version, entry.bundled, entry.url, entry.sha256) == ("1.0.0", True, None, None)
    assert entry.labels[0] == "liver" and len(set(entry.labels)) == len(entry.labels)
    assert cat.path == REPO_RESOURCES / "Models.json"
    with pytest.raises(ModelError, match="not in the catalog .*abdomen-ct-demo"):
        cat.get("no-such-model")


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


