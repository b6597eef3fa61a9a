"""safe_extract_zip refuses hostile archives before writing anything; make_zip is reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from CascadeSegLib.errors import ModelError, UserError
from CascadeSegLib.packaging import archive
from CascadeSegLib.packaging.archive import make_zip, safe_extract_zip

MODEL_JSON = json.dumps({"format_version": 1, "name": "m", "version": "1.0.0"}).encode()


def _zip(path: Path, members: list[tuple[str, bytes]], *, mode: int | None = None,
         compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = compression
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def _listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def _assert_refused(tmp_path: Path, zpath: Path, **kw) -> ModelError:
    """Extraction fails with a one-line ModelError and nothing is created next to the zip."""
    before = _listing(tmp_path)
    dest = tmp_path / "out"
    with pytest.raises(ModelError) as ei:
        safe_extract_zip(zpath, dest, **kw)
    assert isinstance(ei.value, UserError)
    assert "\n" not in str(ei.value)
    assert not dest.exists()
    assert _listing(tmp_path) == before
    assert not (tmp_path.parent / "evil").exists()
    return ei.value


def test_good_zip_with_top_folder_extracts_all_files_identically(tmp_path: Path) -> None:
    weights = os.urandom(5000)
    z = _zip(tmp_path / "m.zip", [("pkg/model.json", MODEL_JSON), ("pkg/stage1.pt", weights),
                                  ("pkg/sub/notes.txt", b"hello")])
    dest = tmp_path / "models" / "m"
    root = safe_extract_zip(z, dest)
    assert root == dest / "pkg"
    assert (root / "model.json").read_bytes() == MODEL_JSON
    assert (root / "stage1.pt").read_bytes() == weights
    assert (root / "sub" / "notes.txt").read_bytes() == b"hello"
    # The temporary extraction folder was renamed into place: nothing else beside dest.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]
    assert _listing(dest) == {"pkg", "pkg/model.json", "pkg/stage1.pt", "pkg/sub",
                              "pkg/sub/notes.txt"}


def test_good_zip_with_files_at_root_returns_dest(tmp_path: Path) -> None:
    z = _zip(tmp_path / "m.zip", [("model.json", MODEL_JSON), ("stage1.pt", b"w" * 10),
                                  ("__MACOSX/._model.json", b"junk")])
    dest = tmp_path / "empty"
    dest.mkdir()  # an existing empty folder is fine
    assert safe_extract_zip(z, dest) == dest
    assert _listing(dest) == {"model.json", "stage1.pt"}


@pytest.mark.parametrize("name, words", [
    ("../evil", "outside"),
    ("pkg/../../evil", "outside"),
    ("pkg\\..\\..\\evil", "outside"),
    ("/tmp/evil", "absolute"),
    ("\\evil", "absolute"),
    ("C:/evil", "absolute"),
    ("c:\\evil", "absolute"),
])
def test_path_traversal_and_absolute_members_refused(tmp_path: Path, name: str, words: str) -> None:
    z = _zip(tmp_path / "bad.zip", [("model.json", MODEL_JSON), ("stage1.pt", b"ok"),
                                    (name, b"pwned")])
    assert zipfile.ZipFile(z).namelist()[-1] == name  # the hostile name really is in the zip
    err = _assert_refused(tmp_path, z)
    assert words in str(err) and repr(name) in str(err)


def test_symlink_member_refused(tmp_path: Path) -> None:
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("model.json", MODEL_JSON)
        info = zipfile.ZipInfo("stage1.pt")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    err = _assert_refused(tmp_path, z)
    assert "symbolic link" in str(err)


def test_zip_bomb_ratio_refused(tmp_path: Path) -> None:
    z = _zip(tmp_path / "bomb.zip", [("model.json", MODEL_JSON),
                                     ("stage1.pt", bytes(32 << 20))])
    info = zipfile.ZipFile(z).getinfo("stage1.pt")
    assert info.file_size / info.compress_size > 500  # really a bomb-like member
    err = _assert_refused(tmp_path, z)
    assert "zip bomb" in str(err)
    # The same archive passes when the caller allows the ratio (nothing else is wrong with it).
    root = safe_extract_zip(z, tmp_path / "ok", max_ratio=1e6)
    assert (root / "stage1.pt").stat().st_size == 32 << 20


def test_total_size_limit_refused(tmp_path: Path) -> None:
    z = _zip(tmp_path / "big.zip", [("model.json", MODEL_JSON), ("a.pt", os.urandom(3000)),
                                    ("b.pt", os.urandom(3000))])
    err = _assert_refused(tmp_path, z, max_total_bytes=5000)
    assert "5000" in str(err)
    assert safe_extract_zip(z, tmp_path / "ok", max_total_bytes=7000) == tmp_path / "ok"


def test_member_larger_than_its_header_refused_and_cleaned(tmp_path: Path) -> None:
    data = os.urandom(1 << 16)
    z = _zip(tmp_path / "lie.zip", [("model.json", MODEL_JSON), ("stage1.pt", data)],
             compression=zipfile.ZIP_STORED)
    raw = bytearray(z.read_bytes())
    # Claim 100 bytes in the central directory entry of stage1.pt (uncompressed size at +24).
    cd = raw.rfind(b"PK\x01\x02")
    assert raw[cd + 46:cd + 46 + 9] == b"stage1.pt"
    struct.pack_into("<I", raw, cd + 24, 100)
    z.write_bytes(bytes(raw))
    _assert_refused(tmp_path, z)


def test_failure_mid_extraction_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    z = _zip(tmp_path / "m.zip", [("model.json", MODEL_JSON), ("stage1.pt", b"x" * 100),
                                  ("stage2.pt", b"y" * 100)])
    real = archive._extract_member
    calls = []

    def flaky(zf, info, target, *a):
        calls.append(info.filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(zf, info, target, *a)

    monkeypatch.setattr(archive, "_extract_member", flaky)
    with pytest.raises(OSError):
        safe_extract_zip(z, tmp_path / "out")
    assert calls == ["model.json", "stage1.pt"]
    assert _listing(tmp_path) == {"m.zip"}  # no dest, no temporary folder


@pytest.mark.parametrize("members, words", [
    ([("pkg/stage1.pt", b"w")], "no model.json"),
    ([("a/model.json", MODEL_JSON), ("b/model.json", MODEL_JSON)], "no model.json"),
    ([("model.json", MODEL_JSON), ("Model.JSON", MODEL_JSON)], "twice"),
])
def test_not_a_package_or_ambiguous_refused(tmp_path: Path, members, words) -> None:
    err = _assert_refused(tmp_path, _zip(tmp_path / "x.zip", members))
    assert words in str(err)


def test_not_a_zip_and_nonempty_dest_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip")
    _assert_refused(tmp_path, bad)
    z = _zip(tmp_path / "m.zip", [("model.json", MODEL_JSON)])
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        safe_extract_zip(z, dest)
    assert _listing(dest) == {"keep.txt"}


def test_make_zip_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    folder = tmp_path / "abdomen"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.json").write_bytes(MODEL_JSON)
    (folder / "stage1.pt").write_bytes(os.urandom(4096))
    (folder / "sub" / "b.txt").write_text("b")
    (folder / ".DS_Store").write_text("hidden")
    z1 = make_zip(folder, tmp_path / "a" / "one.zip")
    os.utime(folder / "stage1.pt", (1_000_000, 1_000_000))  # mtimes must not matter
    z2 = make_zip(folder, tmp_path / "two.zip")
    assert hashlib.sha256(z1.read_bytes()).digest() == hashlib.sha256(z2.read_bytes()).digest()
    with zipfile.ZipFile(z1) as zf:
        assert zf.namelist() == ["model.json", "stage1.pt", "sub/b.txt"]
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
        assert all(stat.S_IMODE(i.external_attr >> 16) == 0o644 for i in zf.infolist())
    root = safe_extract_zip(z1, tmp_path / "x")
    assert root == tmp_path / "x"
    for rel in ("model.json", "stage1.pt", "sub/b.txt"):
        assert (root / rel).read_bytes() == (folder / rel).read_bytes()
    assert not (root / ".DS_Store").exists()
    zp = make_zip(folder, tmp_path / "p.zip", prefix="abdomen")
    assert safe_extract_zip(zp, tmp_path / "y") == tmp_path / "y" / "abdomen"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["one.zip"]  # no temp left


def test_make_zip_needs_model_json(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    with pytest.raises(ModelError, match="no model.json"):
        make_zip(tmp_path / "f", tmp_path / "f.zip")
    assert not (tmp_path / "f.zip").exists()
