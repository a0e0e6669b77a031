"""Per-pod progress on stderr while agents are injected, started and reached.

Why: injecting into a dozen pods takes seconds to minutes (image pulls), and
a silent command looks hung. On a terminal the display is one line per pod,
redrawn in place; otherwise (CI logs, pipes) each state change is one plain
line, so logs stay readable. stdout is never touched: it carries the data.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

QUIET_STATES = {"checking", "done"}  # not worth a line of their own in plain mode


class Progress:
    """Callable ``(pod, state, detail)``; ``close()`` leaves the final table on a terminal."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty() if tty is None else tty
        self._rows: dict[str, tuple[str, str]] = {}
        self._drawn = 0
        self._lock = threading.Lock()

    def __call__(self, pod: str, state: str, detail: str = "") -> None:
        with self._lock:
            if self._tty:
                if state == "done":
                    return
                self._rows[pod] = (state, detail)
                self._redraw()
            elif state not in QUIET_STATES:
                tail = f": {detail}" if detail else ""
                print(f"meridio-debug: {pod}: {state}{tail}", file=self._stream, flush=True)

    def _redraw(self) -> None:
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")
        width = max(len(p) for p in self._rows)
        for pod, (state, detail) in self._rows.items():
            line = f"{pod:<{width}}  {state:<10} {detail}"
            out.append("\x1b[2K" + line[:200] + "\n")
        self._drawn = len(self._rows)
        self._stream.write("".join(out))
        self._stream.flush()

    def close(self) -> None:
        with self._lock:
            self._drawn = 0
