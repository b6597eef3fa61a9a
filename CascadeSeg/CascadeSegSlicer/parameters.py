"""What the user chose in the module panel, as a plain dataclass (no Qt, no MRML)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from CascadeSegLib.resources import DEFAULT_MODEL

DEVICES = ("auto", "cuda", "cpu", "mps")


@dataclass
class SegmentParameters:
    """Options of one `cascadeseg segment` run; the widget edits one of these."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    overlap: bool = False
    stage1_only: bool = False
    keep_probabilities: bool = False
    keep_candidates: bool = False
    create_new_segmentation: bool = False
    refine: bool = False            # Zhou et al. iterative refinement of every organ's box

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")

    def cli_args(self, input_path: str | Path, output_dir: str | Path) -> list[str]:
        """Arguments after `cascadeseg` for the `segment` contract in docs/architecture.md."""
        args = ["segment", str(input_path), "-o", str(output_dir), "--model", self.model,
                "--device", self.device, "--progress-json", "--no-report", "--overwrite"]
        if self.overlap:
            args.append("--overlap")
        if self.stage1_only:
            args.append("--stage1-only")
        if self.keep_probabilities:
            args.append("--save-probabilities")
        if self.keep_candidates:
            args.append("--save-candidates")
        if self.refine and not self.stage1_only:
            args.append("--refine")
        return args

    def to_dict(self) -> dict:
        return asdict(self)
