"""Safe extraction and deterministic creation of model-package zips.

Model zips come from the internet, so extraction trusts nothing in them: every member name,
type and size is checked before a single byte is written (zip slip, absolute paths, symlinks,
zip bombs), and the result appears in one `os.replace` so a reader never sees half a model.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..atomic import atomic_path
from ..errors import ModelError

#: Members smaller than this are never refused for their compression ratio alone (a short
#: JSON file of repeated keys can legitimately compress 100x); the total ratio still counts.
RATIO_MIN_BYTES = 1 << 20
_COPY_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_IGNORED_TOP = ("__MACOSX",)
# Fixed timestamp so that the same folder always gives the same zip bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _member_parts(info: zipfile.ZipInfo, zip_name: str) -> tuple[str, ...]:
    """Validated path components of a member, or ModelError naming the offending member."""
    raw = info.filename
    name = raw.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        raise ModelError(f"{zip_name}: member {raw!r} has an absolute path; refusing to extract "
                         "this archive (get the model from a trusted source)")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise ModelError(f"{zip_name}: member {raw!r} points outside the folder ('..'); refusing "
                         "to extract this archive (get the model from a trusted source)")
    if any(_DRIVE.match(p) or "\0" in p for p in parts):
        raise ModelError(f"{zip_name}: member {raw!r} has an invalid name; refusing to extract")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ModelError(f"{zip_name}: member {raw!r} is a symbolic link; refusing to extract "
                         "this archive (model packages contain plain files only)")
    if info.flag_bits & 0x1:
        raise ModelError(f"{zip_name}: member {raw!r} is encrypted; model packages must not be")
    return parts


def _plan(zf: zipfile.ZipFile, zip_name: str, max_total_bytes: int | None,
          max_ratio: float) -> tuple[list[tuple[zipfile.ZipInfo, tuple[str, ...]]], tuple[str, ...]]:
    """Check every member; return (files to write, path of the folder holding model.json)."""
    files: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    seen: set[tuple[str, ...]] = set()
    total = 0
    total_compressed = 0
    for info in zf.infolist():
        parts = _member_parts(info, zip_name)
        if not parts or parts[0] in _IGNORED_TOP:
            continue
        if info.is_dir() or info.filename.endswith("\\"):
            continue
        key = tuple(p.lower() for p in parts)
        if key in seen:
            raise ModelError(f"{zip_name}: member {info.filename!r} appears twice; refusing to "
                             "extract an ambiguous archive")
        seen.add(key)
        total += info.file_size
        total_compressed += info.compress_size
        if max_total_bytes is not None and total > max_total_bytes:
            raise ModelError(f"{zip_name}: unpacks to more than {max_total_bytes} bytes (the "
                             "limit); refusing to extract (possible zip bomb)")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= RATIO_MIN_BYTES and ratio > max_ratio:
            raise ModelError(f"{zip_name}: member {info.filename!r} expands {ratio:.0f}x (limit "
                             f"{max_ratio:g}x); refusing to extract (possible zip bomb)")
        files.append((info, parts))
    if total >= RATIO_MIN_BYTES and total / max(total_compressed, 1) > max_ratio:
        raise ModelError(f"{zip_name}: expands {total / max(total_compressed, 1):.0f}x (limit "
                         f"{max_ratio:g}x); refusing to extract (possible zip bomb)")
    # Also check files against implied directories: "a" as a file and "a/b" would clash.
    dirs = {k[:i] for k in seen for i in range(1, len(k))}
    clash = dirs & seen
    if clash:
        raise ModelError(f"{zip_name}: {'/'.join(sorted(clash)[0])!r} is both a file and a "
                         "folder; refusing to extract")
    paths = {parts for _, parts in files}
    if ("model.json",) in paths:
        return files, ()
    tops = {parts[0] for parts in paths}
    if len(tops) == 1:
        top = next(iter(tops))
        if (top, "model.json") in paths:
            return files, (top,)
    raise ModelError(f"{zip_name}: no model.json at the top of the archive or in its single "
                     "top-level folder; this is not a CascadeSeg model package")


def safe_extract_zip(zip_path: str | os.PathLike, dest_dir: str | os.PathLike,
                     max_total_bytes: int | None = None, max_ratio: float = 200.0) -> Path:
    """Extract a model zip into `dest_dir` (which must not exist, or be an empty folder).

    Every member is checked before anything is written; the files are extracted into a
    temporary folder beside `dest_dir` and moved into place with one `os.replace`, so on any
    error `dest_dir` is left as it was. Returns the folder that contains `model.json`
    (`dest_dir` itself, or its single top-level folder).
    """
    zip_path = Path(zip_path)
    dest = Path(dest_dir)
    zip_name = zip_path.name
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelError(f"{dest} already exists and is not empty; choose another folder or "
                         "remove it first")
    try:
        zf = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise ModelError(f"model archive {zip_path} does not exist; check the path") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{zip_path} is not a readable zip file ({exc}); download it again"
                         ) from None
    with zf:
        files, top = _plan(zf, zip_name, max_total_bytes, max_ratio)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extract", dir=dest.parent))
        try:
            written = 0
            for info, parts in files:
                target = tmp.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                written += _extract_member(zf, info, target, zip_name, max_total_bytes, written)
            try:
                if dest.exists():
                    dest.rmdir()  # empty (checked above); os.replace onto a directory is not portable
                os.replace(tmp, dest)
            except OSError:
                if not dest.joinpath(*top, "model.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process put the same files there first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest.joinpath(*top)


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, zip_name: str,
                    max_total_bytes: int | None, written_before: int) -> int:
    """Stream one member to disk, refusing to write more than its header declared."""
    n = 0
    try:
        with zf.open(info) as src, open(target, "xb") as dst:
            while True:
                chunk = src.read(_COPY_CHUNK)
                if not chunk:
                    break
                n += len(chunk)
                if n > info.file_size or (max_total_bytes is not None
                                          and written_before + n > max_total_bytes):
                    raise ModelError(f"{zip_name}: member {info.filename!r} is larger than its "
                                     "header says; refusing to extract (damaged or malicious)")
                dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise ModelError(f"{zip_name}: member {info.filename!r} is damaged ({exc}); download "
                         "the model again") from None
    return n


def make_zip(folder: str | os.PathLike, zip_path: str | os.PathLike,
             prefix: str | None = None) -> Path:
    """Zip a model folder reproducibly (sorted names, fixed timestamps and permissions).

    The same folder content always gives byte-identical zips, so an exported model's sha256
    can be published. Hidden files (names starting with '.') are left out; symbolic links are
    refused. `prefix` puts the files under one top-level folder of that name. The zip is
    written to a temporary file and moved into place.
    """
    folder = Path(folder)
    zip_path = Path(zip_path)
    if not (folder / "model.json").is_file():
        raise ModelError(f"{folder} has no model.json; it is not a model package folder")
    if prefix is not None and (not prefix or "/" in prefix or "\\" in prefix
                               or prefix in (".", "..")):
        raise ModelError(f"invalid top-level folder name {prefix!r} for the zip")
    members: list[tuple[str, Path]] = []
    for root, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in filenames:
            if fname.startswith("."):
                continue
            path = Path(root) / fname
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                raise ModelError(f"{path} is a symbolic link; copy the real file into the model "
                                 "folder before exporting")
            members.append((rel if prefix is None else f"{prefix}/{rel}", path))
        for d in list(dirnames):
            if (Path(root) / d).is_symlink():
                raise ModelError(f"{Path(root) / d} is a symbolic link; model folders must "
                                 "contain plain files only")
    members.sort()
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(zip_path) as tmp:
        with open(tmp, "xb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for arcname, path in members:
                info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # Unix, so the permission bits mean the same everywhere
                with open(path, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK)
    return zip_path
