"""configs/build_atlas_model.py refuses settings a package could not load, before it registers
anything (minutes of work), with a one-line error and exit code 2, and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("options, message", [
    (["--intensity-weight", "9"], "intensity_weight in [0, 4]"),
    (["--intensity-core-share", "0.5"], "intensity_core_share in (0.5, 1]"),
    (["--mixup-share", "0.4"], "mixup_share must lie in (0.5, 1]"),
    (["--mixup-share", "0.7", "--mixup-organs", "liver", "lung"], "mixup_organs names unknown organs ['lung']"),
    (["--mixup-organs", "liver", "spleen"], "--mixup-organs needs --mixup-share"),
    (["--network-weight", "1.5"], "network_weight 1.5 is outside [0, 1]"),
    (["--min-scan-agreement", "1"], "min_scan_agreement 1.0 is outside [0, 1)"),
])
def test_bad_prior_settings_stop_the_build_before_any_work(tmp_path: Path, options: list[str], message: str) -> None:
    out, work = tmp_path / "pkg", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "configs" / "build_atlas_model.py"), "-o", str(out),
                           "--work", str(work), *options], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not out.exists() and not work.exists()


def test_the_default_options_build_the_shipped_packages_atlas_settings() -> None:
    """One command retrains the default model: build_atlas_model's defaults are its settings."""
    sys.path.insert(0, str(REPO / "configs"))
    try:
        import build_atlas_model
    finally:
        sys.path.remove(str(REPO / "configs"))
    from CascadeSegLib.inference.atlas_prior import AtlasPriorSpec
    from CascadeSegLib.packaging.model import load_model

    shipped = load_model("abdomen-ct").atlas_prior
    assert shipped is not None
    settings = build_atlas_model.prior_settings(build_atlas_model.parser().parse_args(["-o", "unused"]))
    assert AtlasPriorSpec.from_json({**settings, "atlases": [a.to_json() for a in shipped.atlases]}) == shipped
