"""Model installation (from a URL, a local zip or a catalog name) and the `cascadeseg models` commands
against a tiny but real model package served by a local HTTP server. The catalog and downloads are
in test_catalog_download.py."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from packaging_helpers import REPO_RESOURCES, _entry, _Server, _tree, make_package, sha

# the fixtures _isolated_models (autouse) and server, imported so that pytest finds them here
from packaging_helpers import isolated_models_fixture as isolated_models_fixture
from packaging_helpers import server_fixture as server_fixture

from CascadeSegLib import resources
from CascadeSegLib.commands import models as models_cmd
from CascadeSegLib.errors import ModelError
from CascadeSegLib.packaging.archive import make_zip
from CascadeSegLib.packaging.catalog import load_catalog
from CascadeSegLib.packaging.download import install_model


@pytest.fixture(scope="module")
def package_zip(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pkg")
    return make_zip(make_package(d / "tiny-organs"), d / "tiny-organs-1.0.0.zip",
                    prefix="tiny-organs")



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
