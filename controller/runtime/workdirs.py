"""Private working directories of agents and relays, and what removes them when a run dies.

Who removes a ``meridio-debug-agent-*`` or ``meridio-debug-pf-*`` directory:

- the run that made it, on normal exit, exceptions, Ctrl-C and SIGTERM;
- for agent directories after ``kill -9`` of the controller, the agent
  launcher: it sees its stdin close, stops every agent and removes their
  directories (agent/launcher.py);
- if both died (``kill -9`` of the launcher too), the next run: ``sweep``
  removes directories of ours that are older than STALE_S and whose socket
  nobody serves any more, nor a live controller owns (``mark_owner``: the one
  directory of a local runtime's one-shot snapshots). A live agent's or relay's
  directory is kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time

PREFIXES = ("meridio-debug-agent-", "meridio-debug-pf-")
STALE_S = 60.0
OWNER_FILE = "owner.pid"  # a live controller's pid: its directory is in use


def mark_owner(path: str) -> None:
    """Say that this process uses directory ``path`` (``sweep`` keeps it while we live)."""
    with open(os.path.join(path, OWNER_FILE), "w", encoding="ascii") as f:
        f.write(str(os.getpid()))


def _owner_alive(path: str) -> bool:
    try:
        with open(os.path.join(path, OWNER_FILE), encoding="ascii") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _served(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def sweep(tmp: str | None = None, now: float | None = None) -> list[str]:
    """Remove stale directories of dead runs in ``tmp``; the paths removed."""
    tmp = tmp or tempfile.gettempdir()
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    uid = os.geteuid()
    for name in names:
        if not name.startswith(PREFIXES):
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != uid:
            continue
        if (
            now - st.st_mtime < STALE_S
            or _served(os.path.join(path, "agent.sock"))
            or _owner_alive(path)
        ):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
            removed.append(path)
    return removed
