"""Catch ITK/GDCM warnings before they reach the terminal, as one-line messages.

ITK prints warnings straight to the process's stderr file descriptor as multi-line blocks
("WARNING: In .../itkGDCMSeriesFileNames.cxx, line 101 / GDCMSeriesFileNames (0x..): No Series
were found"). Python cannot intercept them, so while an ITK call runs, file descriptor 2 points
at a temporary file; afterwards the blocks become one line each and anything else is passed on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# "WARNING: In /path/file.cxx, line 101\nClass (0x55..): message\n\n"
_BLOCK = re.compile(r"(?:WARNING|ERROR): In [^\n]*, line \d+\n(?P<body>.*?)(?:\n\s*\n|\Z)", re.S)
_OBJECT = re.compile(r"^\s*\w+ \(0x[0-9a-fA-F]+\): ?")


def parse_itk_output(text: str) -> tuple[list[str], str]:
    """(one-line messages, text that was not an ITK message block)."""
    messages: list[str] = []
    for m in _BLOCK.finditer(text):
        line = " ".join(_OBJECT.sub("", m.group("body")).split())
        if line and line not in messages:
            messages.append(line)
    return messages, _BLOCK.sub("", text)


class ItkMessages(list):
    """The one-line messages caught by `captured_itk_messages` (filled when the block exits)."""


@contextlib.contextmanager
def captured_itk_messages() -> Iterator[ItkMessages]:
    """Redirect fd 2 while ITK runs; yields a list that holds the messages afterwards.

    Nesting is safe (the inner block catches, the outer sees nothing). Where fd 2 cannot be
    redirected (no such descriptor), ITK's output is left alone.
    """
    caught = ItkMessages()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield caught
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield caught
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            messages, rest = parse_itk_output(text)
            caught.extend(messages)
            if rest.strip():
                sys.stderr.write(rest)
                sys.stderr.flush()
