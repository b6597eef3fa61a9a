"""Reliability: damaged or mismatched models, model-file security, downloads, devices.

Model problems are user errors (exit 2, one line saying to re-install / update), never
tracebacks. Weights never execute code (`weights_only=True` after the sha256 matched), hostile
zips are refused before a byte is written, downloads land only in the models folder and are
used only after their sha256 matched. On a GPU, out-of-memory retries with fewer tiles per
batch and then falls back to the CPU (tested on the CPU with a fake network).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from model_factory import make_random_model

from CascadeSegLib.cli import main
from CascadeSegLib.inference import memory, tiling
from CascadeSegLib.inference.cascade import Segmenter
from CascadeSegLib.network import NetConfig, build_network
from CascadeSegLib.packaging.archive import make_zip
from CascadeSegLib.packaging.model import ModelPackage
from CascadeSegLib.phantom import make_phantom


@pytest.fixture(autouse=True)
def _isolated_models(tmp_path: Path, monkeypatch) -> Path:
    d = tmp_path / "user_models"
    monkeypatch.setenv("CASCADESEG_MODELS", str(d))
    return d


@pytest.fixture(scope="module")
def pristine_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pristine") / "random-test"
    make_random_model(folder)
    return folder


@pytest.fixture
def model_dir(pristine_model, tmp_path) -> Path:
    """A fresh copy each test may damage."""
    return Path(shutil.copytree(pristine_model, tmp_path / "random-test"))


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory) -> Path:
    ct, _ = make_phantom(size=(40, 36, 20), spacing=(4.0, 4.0, 5.0), seed=6)
    path = tmp_path_factory.mktemp("ct") / "ct.nrrd"
    sitk.WriteImage(ct, str(path))
    return path


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


def one_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in err if ln.startswith("cascadeseg: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def segment(ct_path: Path, model: Path, out: Path, *extra: str) -> int:
    return main(["segment", str(ct_path), "-o", str(out), "--model", str(model), "--quiet", *extra])


def edit_json(model_dir: Path, change) -> None:
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    change(meta)
    (model_dir / "model.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- damaged packages


def test_missing_weight_file(model_dir, ct_path, tmp_path, capsys):
    (model_dir / "stage2.pt").unlink()
    assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
    line = one_error(capsys)
    assert "stage2.pt is missing" in line and "re-install" in line
    assert not (tmp_path / "o.nii.gz").exists()


def test_missing_model_json_and_unknown_name(model_dir, ct_path, tmp_path, capsys):
    (model_dir / "model.json").unlink()
    assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
    assert "no model.json" in one_error(capsys)
    assert segment(ct_path, Path("no-such-model"), tmp_path / "o.nii.gz") == 2
    line = one_error(capsys)
    assert "'no-such-model' not found" in line and "models list" in line


def test_wrong_checksum(model_dir, ct_path, tmp_path, capsys):
    data = bytearray((model_dir / "stage1.pt").read_bytes())
    data[-20] ^= 0xFF
    (model_dir / "stage1.pt").write_bytes(bytes(data))
    assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
    line = one_error(capsys)
    assert "stage1.pt fails its sha256 check" in line and "re-install" in line
    assert main(["models", "verify", str(model_dir)]) == 2
    assert "damaged or was altered" in one_error(capsys)


def test_unknown_format_version(model_dir, ct_path, tmp_path, capsys):
    edit_json(model_dir, lambda m: m.update(format_version=7))
    assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
    line = one_error(capsys)
    assert "format version 7 is not supported" in line and "update CascadeSeg" in line


def test_label_set_not_matching_the_networks(model_dir, ct_path, tmp_path, capsys):
    # model.json lists 4 organs but the networks predict 3 + background.
    edit_json(model_dir, lambda m: m["labels"].append({"value": 4, "name": "pancreas"}))
    assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
    assert "predicts 4 classes but the label list needs 5" in one_error(capsys)
    # Labels and network config edited consistently, but the weights are for 4 classes.

    def five_classes(m):
        for s in m["stages"]:
            s["network"]["num_classes"] = 5
    edit_json(model_dir, five_classes)
    assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
    line = one_error(capsys)
    assert "stage1.pt does not fit its network config" in line
    assert "size mismatch for head" in line and "re-export the model" in line


def test_invalid_model_json(model_dir, pristine_model, ct_path, tmp_path, capsys):
    (model_dir / "model.json").write_text('{"format_version": 1, "name": "x"')
    assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
    assert "cannot read" in one_error(capsys)
    edit_json_text = {"format_version": 1, "name": "x", "version": "1"}
    (model_dir / "model.json").write_text(json.dumps(edit_json_text))
    assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
    assert "is invalid (KeyError" in one_error(capsys)
    # a window or normalisation that cannot scale HU is refused when the package loads, not mid-run
    for intensity, message in (({"window": [300, -200]}, "low then high"),
                               ({"window": [-200, 300], "normalization": "zscore"}, "unknown intensity normalization")):
        meta = json.loads((pristine_model / "model.json").read_text())
        meta["intensity"] = intensity
        (model_dir / "model.json").write_text(json.dumps(meta))
        assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
        error = one_error(capsys)
        assert message in error and "fix model.json" in error
    # stage grids and the C2 dilation: a zero spacing was an internal error (exit 1), a 64.5 tile and
    # a 2.5-voxel dilation were cut to whole numbers without a word
    for edit, message in ((lambda m: m["stages"][0].update(spacing=[0, 6, 6]), "stage1: spacing must be three"),
                          (lambda m: m["stages"][1].update(spacing=[3, 3]), "stage2: spacing must be three"),
                          (lambda m: m["stages"][0].update(tile=[32.5, 32, 32]), "tile must be three positive whole"),
                          (lambda m: m.update(dilation_radius=2.5), "dilation_radius must be a whole number"),
                          # label entries: a 3.7 was cut to 3, a 300-255-0 colour reached Slicer, a provenance
                          # string was "dictionary update sequence element #0 has length 1"
                          (lambda m: m["labels"][2].update(value=3.7), "value must be a whole number from 1 to 255"),
                          (lambda m: m["labels"][0].update(color=[300, 255, 0]), "color must be three whole numbers"),
                          (lambda m: m["labels"][0].update(color=[255, 0]), "color must be three whole numbers"),
                          (lambda m: m["labels"][1].update(name=""), "label name must be a non-empty string"),
                          (lambda m: m.update(provenance="trained by us"), "provenance must be a JSON object")):
        meta = json.loads((pristine_model / "model.json").read_text())
        edit(meta)
        (model_dir / "model.json").write_text(json.dumps(meta))
        assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
        error = one_error(capsys)
        assert message in error and "re-export or re-install" in error, error


# ----------------------------------------------------------------------------- weights never run code


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_load_with_weights_only_and_cannot_run_code(model_dir, ct_path, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    torch.save({"head.weight": _Evil(str(marker))}, model_dir / "stage1.pt")
    # An attacker who controls the package also fixes the checksum.
    digest = hashlib.sha256((model_dir / "stage1.pt").read_bytes()).hexdigest()
    edit_json(model_dir, lambda m: m["stages"][0].update(sha256=digest))
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert segment(ct_path, model_dir, tmp_path / "o.nii.gz") == 2
    line = one_error(capsys)
    assert "cannot load stage1.pt" in line and "re-install" in line
    assert seen and all(w is True for w in seen)
    assert not marker.exists()


# ----------------------------------------------------------------------------- hostile zips


def _zip_with(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "bomb"])
def test_hostile_model_zip_refused_before_anything_is_written(pristine_model, tmp_path, capsys, kind,
                                                              _isolated_models):
    members = {f"random-test/{p.name}": p.read_bytes() for p in pristine_model.iterdir()}
    outside = tmp_path / "escaped.txt"
    link = None
    if kind == "dotdot":
        members["random-test/../../escaped.txt"] = b"x"
        needle = "points outside the folder"
    elif kind == "absolute":
        members[str(outside)] = b"x"
        needle = "absolute path"
    elif kind == "symlink":
        link = "random-test/link"
        needle = "symbolic link"
    else:
        members["random-test/padding.bin"] = b"\0" * (64 << 20)  # 64 MB that compress ~1000x
        needle = "zip bomb"
    archive = _zip_with(tmp_path / "model.zip", members, link)
    before = tree(tmp_path)
    assert main(["models", "install", str(archive)]) == 2
    assert needle in one_error(capsys)
    assert tree(tmp_path) - before <= {"user_models"}  # at most the (empty) models folder itself
    assert tree(_isolated_models) == set()
    assert not outside.exists()


# ----------------------------------------------------------------------------- downloads


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        body, start = srv.body, 0
        if rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
        payload = body[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(payload)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if srv.drop_after is not None:
            n, srv.drop_after = srv.drop_after, None
            self.wfile.write(payload[:n])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests, srv.body, srv.drop_after = [], b"", None
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_interrupted_download_resumes_and_never_leaves_a_half_model(pristine_model, tmp_path, server, capsys,
                                                                     _isolated_models, monkeypatch):
    blob = make_zip(pristine_model, tmp_path / "m.zip", prefix="random-test").read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    server.body, server.drop_after = blob, len(blob) // 2
    url = f"http://127.0.0.1:{server.server_address[1]}/m.zip"
    monkeypatch.chdir(tmp_path)
    cwd_before = tree(tmp_path)
    assert main(["models", "install", url, "--sha256", sha]) == 2
    assert "run the same command again to resume" in one_error(capsys)
    # Only the resumable .part in the hidden downloads folder: no model, nothing half-extracted.
    parts = tree(_isolated_models)
    assert {p for p in parts if "/" not in p} == {".downloads"}
    part_files = [p for p in parts if p.endswith(".part")]
    assert len(part_files) == 1 and (_isolated_models / part_files[0]).stat().st_size == len(blob) // 2
    assert main(["models", "list"]) == 0 and "random-test" not in capsys.readouterr().out.split("installed")[0]
    assert main(["models", "install", url, "--sha256", sha]) == 0
    assert server.requests == [None, f"bytes={len(blob) // 2}-"]
    assert tree(_isolated_models) == {".downloads", "random-test", "random-test/model.json",
                                      "random-test/stage1.pt", "random-test/stage2.pt"}
    ModelPackage.load(_isolated_models / "random-test").verify()
    assert tree(tmp_path) - cwd_before <= {p for p in tree(tmp_path) if p.startswith("user_models")}


def test_download_used_only_after_its_sha256_matches(pristine_model, tmp_path, server, capsys, _isolated_models,
                                                     monkeypatch):
    from CascadeSegLib.packaging import download

    blob = make_zip(pristine_model, tmp_path / "m.zip", prefix="random-test").read_bytes()
    server.body = blob
    url = f"http://127.0.0.1:{server.server_address[1]}/m.zip"
    extracted = []
    monkeypatch.setattr(download, "safe_extract_zip", lambda *a, **k: extracted.append(a))
    assert main(["models", "install", url, "--sha256", "ab" * 32]) == 2
    line = one_error(capsys)
    assert "expected " + "ab" * 32 in line and "deleted" in line
    assert extracted == [] and tree(_isolated_models) == {".downloads"}


@pytest.mark.parametrize("url", ["http://example.com/m.zip", "ftp://example.com/m.zip", "smb://nas/m.zip"])
def test_only_https_or_local_files(url, capsys, _isolated_models, monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request.OpenerDirector, "open",
                        lambda *a, **k: pytest.fail("a network request was made"))
    assert main(["models", "install", url]) == 2
    assert "refusing to download" in one_error(capsys)
    assert not _isolated_models.exists()


# ----------------------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_gpu_with_device_cuda_is_a_clear_error(pristine_model, ct_path, tmp_path, capsys):
    assert segment(ct_path, pristine_model, tmp_path / "o.nii.gz", "--device", "cuda") == 2
    line = one_error(capsys)
    assert "no CUDA GPU is available" in line and "--device cpu" in line


def _oom() -> BaseException:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class OOMForBatches(torch.nn.Module):
    """A real network that raises CUDA OOM for batches of more than `limit` tiles."""

    def __init__(self, net: torch.nn.Module, limit: int = 1) -> None:
        super().__init__()
        self.net, self.cfg, self.limit, self.batches = net, net.cfg, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise _oom()
        return self.net(x)


def test_out_of_memory_errors_are_recognised():
    assert memory.is_out_of_memory(_oom())
    assert memory.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))


def test_cuda_oom_retries_with_fewer_tiles_per_batch():
    torch.manual_seed(0)
    net = build_network(NetConfig(kind="padded", num_classes=3, base_channels=4, depth=2)).eval()
    vol = torch.rand(1, 40, 48, 44)
    mask = torch.zeros(40, 48, 44, dtype=torch.bool)
    mask[5:35, 4:44, 6:40] = True
    expected = tiling.predict_volume(net, vol, mask, (16, 16, 16), 3, batch_size=1)
    fake = OOMForBatches(net, limit=1)
    retries = []
    got = tiling.predict_volume(fake, vol, mask, (16, 16, 16), 3, batch_size=4, on_oom=retries.append)
    assert retries == [2, 1]
    assert fake.batches[:3] == [4, 2, 1] and set(fake.batches[3:]) == {1}
    torch.testing.assert_close(got, expected)


class AlwaysOOM(torch.nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x):
        raise _oom()


def test_gpu_oom_at_one_tile_falls_back_to_cpu_with_a_message(pristine_model):
    model = ModelPackage.load(pristine_model)
    ct, _ = make_phantom(size=(40, 36, 20), spacing=(4.0, 4.0, 5.0), seed=6)
    expected = Segmenter(model, "cpu").segment(ct).labels
    messages = []
    seg = Segmenter(model, "cpu", on_warning=messages.append)
    seg.fallback_device = torch.device("cpu")  # the hook: pretend "cpu" is the GPU that fills up
    seg._nets = {i: AlwaysOOM(s.network) for i, s in enumerate(model.stages)}
    result = seg.segment(ct)
    assert len(messages) == 1 and "out of memory" in messages[0] and "CPU" in messages[0]
    assert seg.device.type == "cpu" and seg.fallback_device is None
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(expected))
    # A second OOM, with nothing left to fall back to, is not swallowed.
    seg._nets = {i: AlwaysOOM(s.network) for i, s in enumerate(model.stages)}
    with pytest.raises(torch.cuda.OutOfMemoryError):
        seg.segment(ct)


def test_gpu_oom_in_the_cli_is_one_line(pristine_model, ct_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Segmenter, "segment", lambda self, img: (_ for _ in ()).throw(_oom()))
    assert segment(ct_path, pristine_model, tmp_path / "o.nii.gz") == 2
    line = one_error(capsys)
    assert "GPU ran out of memory" in line and "--device cpu" in line


def test_cli_reports_the_fallback_and_still_succeeds(pristine_model, ct_path, tmp_path, capsys, monkeypatch):
    import functools

    original = Segmenter.__init__

    failing = {"stages": (1,)}

    @functools.wraps(original)
    def gpu_that_fills_up(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.fallback_device = torch.device("cpu")
        self._nets = {i: OOMForBatches(build_network(s.network), limit=0) for i, s in enumerate(self.model.stages)
                      if i in failing["stages"]}

    monkeypatch.setattr(Segmenter, "__init__", gpu_that_fills_up)
    out = tmp_path / "o.nii.gz"
    # Stage 2's overlapping tiles run in batches: fewer tiles per batch first, then the CPU.
    assert segment(ct_path, pristine_model, out, "--batch-size", "4", "--overlap", "0.5") == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cascadeseg: warning:")]
    assert any("retrying with 2 tile(s) per batch" in w for w in warnings), warnings
    assert any("continuing on the CPU" in w for w in warnings), warnings
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(ct_path)).GetSize()
    # The default box cover: a window this small failing means a full device, so straight to the CPU.
    failing["stages"] = (0, 1)
    assert segment(ct_path, pristine_model, out, "--overwrite") == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cascadeseg: warning:")]
    assert any("continuing on the CPU" in w for w in warnings), warnings
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(ct_path)).GetSize()
