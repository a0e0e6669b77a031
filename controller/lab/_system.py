"""The lab's contact with the host: running tools, finding namespaces and our processes.

Why in one private module: every rule about touching the system lives here.
Commands are argv lists (never a shell); a failing command becomes a
one-line LabError naming what was being done. Processes are only ever
signalled after they are identified as the lab's own (containers.py: the
container marker in a PID 1's environment), so a recycled pid or someone
else's process in a lab namespace is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from meridio_debug.controller.errors import LabError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
# Run by path with ``python -I -S``: the standard library only. As ``-m`` it imported
# the lab package on the way (~85 ms and ~15 MiB private memory per target; 1,000
# targets would hold ~15 GiB): measured with smaps_rollup on a 168-pod lab.
TARGET_SCRIPT = Path(__file__).with_name("target_server.py")
CLIENT_MODULE = "meridio_debug.controller.lab.traffic_client"
NFT_QUEUE_MODULE = "meridio_debug.controller.lab.nft_queue"
# The pod names build_spec makes; with the exact prefix in front they find a
# lab's namespaces when its lab.json is gone (a crashed or foreign run).
_POD_NAME_RE = re.compile(r"gw|lb-fe-[a-z]|proxy-[a-z]|target-[a-z][0-9]+")
_MAX_WORKERS = 16

T = TypeVar("T")
A = TypeVar("A")


def one_line(text: str, limit: int = 400) -> str:
    """``text`` folded onto one line (for error messages)."""
    folded = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return folded if len(folded) <= limit else folded[: limit - 3] + "..."


def run(argv: Sequence[str], *, what: str, stdin: str | None = None, timeout: float = 30.0) -> str:
    """Run ``argv``; its stdout, or LabError "<what>: <stderr on one line>"."""
    log.debug("run: %s", " ".join(argv))
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from exc
    except OSError as exc:
        raise LabError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    if done.returncode != 0:
        detail = one_line(done.stderr or done.stdout) or f"exit status {done.returncode}"
        raise LabError(f"{what}: {detail}")
    return done.stdout


def parallel(fn: Callable[[A], T], items: Iterable[A]) -> list[T]:
    """``[fn(x) for x in items]`` in threads (they mostly wait for subprocesses).

    Every call runs to its end before the first error is raised, so a failure
    never leaves work running behind the caller's cleanup.
    """
    todo = list(items)
    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(todo))) as pool:
        futures = [pool.submit(fn, x) for x in todo]
    for f in futures:
        exc = f.exception()
        if exc is not None:
            raise exc
    return [f.result() for f in futures]


def batch(lines: Iterable[str]) -> str:
    """``ip -batch -`` input."""
    return "".join(f"{line}\n" for line in lines)


# --- namespaces ---------------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def lab_namespaces(prefix: str) -> list[str]:
    """Existing namespaces named ``prefix`` + a lab pod name (gw, lb-fe-x, proxy-x, target-xN)."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(prefix) and _POD_NAME_RE.fullmatch(n[len(prefix) :])]


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_namespaces(names: Iterable[str]) -> dict[int, str]:
    """pid -> namespace name for every process inside one of ``names`` (like ``ip netns pids``)."""
    wanted = {}
    for name in names:
        ident = _ns_id(str(NETNS_DIR / name))
        if ident is not None:
            wanted[ident] = name
    found: dict[int, str] = {}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ident = _ns_id(f"/proc/{entry}/ns/net")
            if ident in wanted:
                found[int(entry)] = wanted[ident]
    return found


# --- processes ----------------------------------------------------------------------------------


def proc_argv(pid: int) -> list[str] | None:
    """The command line of ``pid``, None when it does not exist (or is a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # zombies and kernel threads have no command line
    return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, waiting to be reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0] if ")" in stat else "?"
    return state not in ("Z", "X")


def kill(pids: Iterable[int], wait: float = 5.0) -> list[int]:
    """SIGKILL ``pids`` (containers' PID 1s: that ends their whole PID namespace); the pids still alive after ``wait`` s."""
    pending = {p for p in pids if pid_alive(p)}
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if pid_alive(p)}
        if pending:
            time.sleep(0.01)
    return sorted(pending)


def wait_for_file(path: Path, pid: int, timeout: float, what: str) -> None:
    """Wait until ``path`` exists (a socket, a pid file) while ``pid`` runs; LabError otherwise."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not pid_alive(pid):
            raise LabError(f"{what}: exited before creating {path.name}")
        if time.monotonic() > deadline:
            raise LabError(f"{what}: no {path.name} after {timeout:g} s")
        time.sleep(0.01)
