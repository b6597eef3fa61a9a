"""Resumable, sha256-checked downloads and model installation.

Models are hundreds of megabytes fetched over hospital networks, so a download survives a
dropped connection (a `.part` file resumed with an HTTP Range request), is refused unless it is
https (plain http only to this machine, for tests), and is checked against its published
sha256 before anything is unpacked. Installation then happens beside the final folder and
appears with one rename: `models_dir` never holds half a model.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..checksum import sha256_file
from ..errors import ModelError
from ..locking import file_lock
from ..resources import bundled_models_dir
from ..resources import models_dir as default_models_dir
from .archive import safe_extract_zip

Progress = Callable[[int, "int | None"], None]   # (bytes done, bytes total or None)

_CHUNK = 1 << 16
_LOOPBACK_NAMES = {"localhost"}
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DOWNLOADS = ".downloads"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_url(source: str) -> bool:
    """True for 'scheme://...' strings (a Windows path like C:\\x is not a URL)."""
    scheme = urllib.parse.urlsplit(source).scheme
    return "://" in source and len(scheme) > 1


def check_url(url: str) -> str:
    """Return the URL's scheme if it may be fetched; ModelError (one line) otherwise."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https":
        if not parts.hostname:
            raise ModelError(f"{url!r} has no host name; check the URL")
        return scheme
    if scheme == "file":
        return scheme
    if scheme == "http":
        if _is_loopback(parts.hostname):
            return scheme
        raise ModelError(f"refusing to download {url} over plain http (it could be altered on "
                         "the way); use an https:// URL")
    raise ModelError(f"refusing to download {url!r}: only https:// URLs, file:// URLs and "
                     "local paths are supported")


def _check_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not _SHA256.match(sha256):
        raise ModelError(f"{sha256!r} is not a sha256 (64 hexadecimal characters); copy it "
                         "again from where the model is published")
    return sha256.lower()


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs we would have accepted in the first place."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl)
        if urllib.parse.urlsplit(newurl).scheme.lower() == "file":
            raise ModelError(f"refusing a redirect from {req.full_url} to a local file")
        if (urllib.parse.urlsplit(req.full_url).scheme.lower() == "https"
                and urllib.parse.urlsplit(newurl).scheme.lower() != "https"):
            raise ModelError(f"refusing a redirect from https to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_SafeRedirects)


def _copy_hashed(src: Any, dst: Any, h: hashlib._Hash, done: int, total: int | None,
                 progress: Progress | None) -> int:
    """Copy `src` to `dst` in chunks, hashing and reporting progress; returns the bytes done so far."""
    while block := src.read(_CHUNK):
        dst.write(block)
        h.update(block)
        done += len(block)
        if progress:
            progress(done, total)
    return done


def _finish(part: Path, dest: Path, h: hashlib._Hash, sha256: str | None, url: str) -> Path:
    digest = h.hexdigest()
    if sha256 is not None and digest != sha256:
        part.unlink(missing_ok=True)
        raise ModelError(f"download of {url} has sha256 {digest}, expected {sha256}; the file "
                         "was deleted (damaged download or wrong checksum)")
    os.replace(part, dest)
    return dest


def download(url: str, dest_file: str | os.PathLike, sha256: str | None = None,
             progress: Progress | None = None, timeout: float = 30) -> Path:
    """Fetch `url` (https, loopback http, file:// or a local path) into `dest_file`.

    The data goes to `dest_file + '.part'`; an existing .part is resumed with a Range request
    (kept if the server answers 206, restarted on 200). A broken connection leaves the .part
    for the next call; a sha256 mismatch deletes it. `progress(done, total)` is called as bytes
    arrive. Returns `dest_file`.
    """
    sha256 = _check_sha(sha256)
    dest = Path(dest_file)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and sha256 is not None and sha256_file(dest) == sha256:
        if progress:
            size = dest.stat().st_size
            progress(size, size)
        return dest
    if not is_url(url):
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", url) and not Path(url).exists():
            check_url(url)  # 'data:...', 'mailto:...': an unsupported scheme, not a file name
        return _copy_local(Path(url), part, dest, sha256, progress, url)
    scheme = check_url(url)
    if scheme == "file":
        return _copy_local(Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path)),
                           part, dest, sha256, progress, url)
    return _download_http(url, part, dest, sha256, progress, timeout)


def _copy_local(src: Path, part: Path, dest: Path, sha256: str | None,
                progress: Progress | None, url: str) -> Path:
    if not src.is_file():
        raise ModelError(f"{src} does not exist or is not a file; check the path")
    total = src.stat().st_size
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(part, "wb") as fout:
        _copy_hashed(fin, fout, h, 0, total, progress)
    return _finish(part, dest, h, sha256, url)


def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) from 'bytes START-END/TOTAL'; (None, None) if unparsable."""
    m = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _download_http(url: str, part: Path, dest: Path, sha256: str | None,
                   progress: Progress | None, timeout: float) -> Path:
    opener = _opener()
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"cascadeseg/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        try:
            resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                # The .part is as long as (or longer than) the file: start again.
                exc.close()
                part.unlink(missing_ok=True)
                have = 0
                headers.pop("Range")
                resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
            else:
                raise
        with resp:
            h = hashlib.sha256()
            length = resp.headers.get("Content-Length")
            remaining = int(length) if length is not None and length.isdigit() else None
            start: int | None = 0
            total: int | None = None
            if resp.status == 206 and have:
                start, total = _content_range_start(resp.headers.get("Content-Range"))
                if start != have:
                    raise ModelError(f"{url}: the server resumed at byte {start}, not {have}; "
                                     "delete the .part file and try again")
                with open(part, "rb") as fh:  # hash what we already have
                    while block := fh.read(1 << 20):
                        h.update(block)
                mode = "ab"
            elif resp.status == 200:
                have = 0
                mode = "wb"
                total = remaining
            else:
                raise ModelError(f"{url}: unexpected HTTP status {resp.status}; try again later")
            done = have
            if total is None and remaining is not None:
                total = have + remaining
            if progress:
                progress(done, total)
            with open(part, mode) as fout:
                done = _copy_hashed(resp, fout, h, done, total, progress)
            if total is not None and done != total:
                raise ModelError(f"download of {url} stopped after {done} of {total} bytes; run "
                                 "the same command again to resume")
    except ModelError:
        raise
    except urllib.error.HTTPError as exc:
        raise ModelError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL") from None
    except urllib.error.URLError as exc:
        raise ModelError(f"cannot reach {url} ({exc.reason}); check the network and try again"
                         ) from None
    except (OSError, EOFError, ValueError, http.client.HTTPException) as exc:
        # http.client.IncompleteRead, connection reset, timeout ...: keep the .part to resume.
        raise ModelError(f"download of {url} was interrupted ({type(exc).__name__}: {exc}); "
                         "run the same command again to resume".replace("\n", " ")) from None
    return _finish(part, dest, h, sha256, url)


# --------------------------------------------------------------------------- install

def _download_name(url: str) -> str:
    """Stable per-URL file name in .downloads/, so a rerun resumes the same .part."""
    base = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "model.zip"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:80]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


def _installed_version(folder: Path) -> str | None:
    from .catalog import read_model_json
    try:
        return str(read_model_json(folder).get("version"))
    except ModelError:
        return None


def install_model(source: str | os.PathLike, models_dir: str | os.PathLike | None = None,
                  sha256: str | None = None, progress: Progress | None = None,
                  overwrite: bool = False, timeout: float = 30) -> Path:
    """Install a model package from a URL, a local .zip (or folder) or a catalog name.

    Downloads to models_dir/.downloads/ (resumable), checks the zip's sha256 (required when the
    catalog publishes one), extracts it safely beside the destination, loads it and checks the
    weights' own sha256s, then moves it to models_dir/<name>. The same name and version
    already installed is replaced only with `overwrite=True`. Returns the installed folder.
    """
    from .catalog import load_catalog
    from .model import ModelPackage

    root = Path(models_dir) if models_dir is not None else default_models_dir()
    sha256 = _check_sha(sha256)
    src = str(source)
    entry = None
    local: Path | None = None
    url: str | None = None
    if is_url(src):
        check_url(src)
        url = src
    elif Path(src).exists():
        local = Path(src)
    else:
        cat = load_catalog()
        if src not in cat and ("/" in src or "\\" in src or src.endswith(".zip")):
            raise ModelError(f"{src} does not exist; check the path")
        entry = cat.get(src)
        if entry.url is None:
            bundled = bundled_models_dir() / entry.name
            if entry.bundled and (bundled / "model.json").is_file():
                return bundled
            raise ModelError(f"model {entry.name!r} has no download URL in the catalog and is "
                             "not bundled with this installation; reinstall CascadeSeg")
        if entry.sha256 is not None:
            if sha256 is not None and sha256 != entry.sha256.lower():
                raise ModelError(f"--sha256 {sha256} differs from the catalog's {entry.sha256} "
                                 f"for {entry.name}; leave --sha256 out or check it")
            sha256 = entry.sha256.lower()
        url = entry.url

    root.mkdir(parents=True, exist_ok=True)
    downloaded: Path | None = None
    work = Path(tempfile.mkdtemp(prefix=".install-", dir=root))
    try:
        if url is not None:
            downloads = root / DOWNLOADS
            downloads.mkdir(parents=True, exist_ok=True)
            with file_lock(downloads):  # one writer per .part file; the others wait, then resume or reuse
                downloaded = download(url, downloads / _download_name(url), sha256, progress, timeout=timeout)
            archive: Path | None = downloaded
            folder = None
        elif local is not None and local.is_dir():
            if sha256 is not None:
                raise ModelError("--sha256 applies to a .zip or URL, not to a folder; the "
                                 "weights' own sha256s in model.json are checked anyway")
            archive, folder = None, work / "pkg"
            shutil.copytree(local, folder, symlinks=False)
        else:
            assert local is not None
            if sha256 is not None:
                digest = sha256_file(local)
                if digest != sha256:
                    raise ModelError(f"{local} has sha256 {digest}, expected {sha256}; the "
                                     "file is damaged or not the one you meant")
            archive, folder = local, None
        if archive is not None:
            if not (archive.suffix.lower() == ".zip" or _looks_like_zip(archive)):
                raise ModelError(f"{source} is not a .zip model package")
            folder = safe_extract_zip(archive, work / "pkg")
        assert folder is not None
        pkg = ModelPackage.load(folder)
        pkg.verify()
        name, version = str(pkg.name), str(pkg.version)
        if not SAFE_NAME.match(name):
            raise ModelError(f"model name {name!r} in model.json cannot be a folder name; use "
                             "letters, digits, '.', '_' and '-'")
        if entry is not None and (name != entry.name or version != entry.version):
            raise ModelError(f"the download for {entry.name} {entry.version} contains "
                             f"{name} {version}; the catalog entry is out of date")
        target = root / name
        with file_lock(root):  # check-then-move, one process at a time
            _move_into_place(folder, target, work, name, version, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
    return target


def _move_into_place(folder: Path, target: Path, work: Path, name: str, version: str, overwrite: bool) -> None:
    """Rename the checked package to `target`, keeping the old one until the new one is in place."""
    if target.exists():
        old_version = _installed_version(target)
        if old_version == version and not overwrite:
            raise ModelError(f"{name} {version} is already installed in {target}; pass "
                             "--overwrite to replace it")
        old = work / "old"
        os.replace(target, old)
        try:
            os.replace(folder, target)
        except BaseException:
            os.replace(old, target)
            raise
    else:
        os.replace(folder, target)


def _looks_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False
