"""Smoke test of benchmarks/bench_slicer.py: a small CT, one run, real MRML and the real CLI.

Checks that the benchmark produces its table with real numbers and that the module logic made
a segmentation with the model's segments. No timing is asserted.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_bench_slicer_small_ct_one_run(tmp_path, capsys):
    from bench_slicer import STEPS, main

    from CascadeSegLib.packaging.model import load_model

    out = tmp_path / "table.md"
    result = main(["--size", "96,96,80", "--repeats", "1", "--device", "cpu", "--cache-dir", str(tmp_path),
                   "--out", str(out)])
    text = capsys.readouterr().out
    assert out.read_text().strip() == result["text"].strip() and result["text"] in text

    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for _, title in STEPS:
        row = next(r for r in rows if r.startswith(f"| {title} |"))
        first, med = (float(c) for c in row.split("|")[2:4])
        assert first >= 0 or title.startswith("other")
    total = next(r for r in rows if "Segment -> segmentation node" in r)
    assert float(total.split("|")[3].strip(" *")) > 0
    assert float(next(r for r in rows if r.startswith("| CLI read -> write")).split("|")[3]) > 0
    ratio = re.search(r"^slicer/cli: ([0-9.]+)x \(first run: ([0-9.]+)x\)$", text, re.M)
    assert ratio and float(ratio.group(1)) > 0
    assert result["median"]["closed surfaces"] > 0 and result["median"]["child startup"] > 0

    names = load_model("abdomen-ct-demo").labels
    assert list(result["segments"]) == [lab.name for lab in names]
    assert result["segments"]["liver"] > 0
