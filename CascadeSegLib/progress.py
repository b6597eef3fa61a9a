"""Progress for people (tqdm on a terminal) and for programs (one JSON object per line)."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

#: how the warning that puts every segment of a result in doubt begins (the atlas check of a scan
#: no atlas agrees with, atlas_check.scan_conflict): Slicer also shows it in a message box
WHOLE_SCAN_WARNING = "atlas check: no atlas's organs agree with the network's"


class JsonProgress:
    """Writes `{"event": ...}` lines to stdout; the Slicer module reads them from a pipe."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def emit(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, **fields}) + "\n")
        self.stream.flush()

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        self.emit("progress", stage=stage, fraction=round(fraction, 4), message=message)

    def close(self) -> None:
        pass


class BarProgress:
    """One tqdm bar per stage on stderr (silent when stderr is not a terminal and quiet)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar = None
        self._stage: str | None = None

    def emit(self, event: str, **fields: Any) -> None:
        pass

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if not self.enabled or stage == "done":
            self.close()
            return
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=100, desc=f"{stage:>11}", unit="%", file=sys.stderr, leave=False,
                             bar_format="{desc} {bar} {percentage:3.0f}% {postfix}")
        if self._bar is not None:
            self._bar.n = int(round(fraction * 100))
            self._bar.set_postfix_str(message, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None
