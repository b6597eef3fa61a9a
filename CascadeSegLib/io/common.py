"""What every reader and writer shares: the image suffix lists, the warning callback, ITK's
messages caught as warning lines and its exceptions shortened to one line."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..itkwarnings import captured_itk_messages

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File endings read as images (plus DICOM folders)."""
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
"""File endings that can be written atomically (single-file formats only)."""
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".seg.nhdr")
"""Slicer segmentations: NRRD files with segment names, colours and terminology."""
NAME_SUFFIXES = SEGMENTATION_SUFFIXES + READ_SUFFIXES
"""Endings removed from a file name to name its case (a longer ending before one it ends with)."""
OUTPUT_SUFFIXES = (".seg.nrrd", *WRITE_SUFFIXES)
"""Output names that are one file (a label map or a segmentation); any other output is a folder."""

# --------------------------------------------------------------------------- helpers

Warn = Callable[[str], None]
# ITK messages that our own error or warning already says better.
_SAID_BETTER = ("No Series were found", "non-orthogonal sform", "orthonormal")


def print_warning(message: str) -> None:
    """The default `on_warning`: one `cascadeseg: warning:` line on stderr."""
    print(f"cascadeseg: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def itk_messages(on_warning: Warn | None) -> Iterator[None]:
    """Run ITK calls with their raw warnings caught; each becomes one warning line.

    On an exception the caught messages are dropped: the one-line error says what went wrong.
    """
    with captured_itk_messages() as caught:
        yield
    for message in caught:
        if not any(s in message for s in _SAID_BETTER):
            (on_warning or print_warning)(message)


def file_suffix(path: Path, choices: Sequence[str]) -> str | None:
    """The (possibly compound) ending of `path` among `choices`, lower-case, or None."""
    name = path.name.lower()
    for s in sorted(choices, key=len, reverse=True):
        if name.endswith(s) and len(name) > len(s):
            return s
    return None


def itk_reason(err: BaseException) -> str:
    """The informative line of a (multi-line) ITK exception message, shortened."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "ERROR" in ln or "error" in ln.lower() or "expected" in ln]
    text = (keep or lines or [type(err).__name__])[-1]
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1].strip()
    # "ImageFileReader(0x55..): msg" -> "msg"
    if "): " in text and text.index("): ") < 60:
        text = text.split("): ", 1)[1]
    for prefix in ("sitk::ERROR:", "ERROR:"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = " ".join(text.split()).rstrip(".;: ")
    return text[:200]
