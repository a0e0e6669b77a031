"""What a running lab is: its state directory and ``lab.json``.

Why a file: ``up``, ``down``, ``status``, ``traffic`` and the analysis run in
different processes (often different CLI invocations). ``lab.json`` records
the spec the lab was built from and every process ``up`` started, so
``down`` removes exactly what was made (recorded pids, exact namespace
names) and other code can ask :func:`load_spec` which pods exist and what
role each has, without re-deriving it from options it never saw.

Layout of ``/run/meridio-debug/lab/<prefix>/`` (tmpfs: gone after a reboot,
like the namespaces themselves)::

    lab.json                 {"spec": ..., "processes": [...], "complete": bool}
    bird-<pod>.conf/.ctl/.log
    lb.nft                   the ruleset loaded into every LB
    target-<pod>.pid
    <pod>.<container>.log    what each container's PID 1 printed
    shm/<pod>/               the pod's /dev/shm (bound there in each of its containers)
    bin/<name>               ``proxy``/``tapa``/...: sleep, named after Meridio's binary

Each record in ``processes`` is a container (lab/containers.py): pod,
container name, what its PID 1 runs, and that PID 1's pid on the host.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from meridio_debug.controller.errors import LabError
from meridio_debug.controller.lab.spec import (
    DEFAULT_PREFIX,
    LabSpec,
    check_prefix,
    spec_from_dict,
    spec_to_dict,
)

STATE_ROOT = Path("/run/meridio-debug/lab")
STATE_FILE = "lab.json"

ProcessKind = Literal["bird", "target", "nfqlb", "idle"]
PROCESS_KINDS: tuple[ProcessKind, ...] = ("bird", "target", "nfqlb", "idle")


@dataclass(frozen=True)
class ProcessRecord:
    """A container ``up`` started: its pod, its name, what its PID 1 runs, and that pid (host)."""

    kind: ProcessKind
    pod: str
    netns: str
    pid: int
    container: str


@dataclass(frozen=True)
class LabState:
    """The contents of ``lab.json``."""

    spec: LabSpec
    processes: tuple[ProcessRecord, ...] = ()
    complete: bool = False


def state_dir(prefix: str, root: Path = STATE_ROOT) -> Path:
    """The state directory of the lab with ``prefix``."""
    return root / check_prefix(prefix)


def bird_paths(directory: Path, pod: str) -> dict[str, Path]:
    """Config, control socket, pid and log file of the bird in ``pod``."""
    return {ext: directory / f"bird-{pod}.{ext}" for ext in ("conf", "ctl", "pid", "log")}


def target_paths(directory: Path, pod: str) -> dict[str, Path]:
    """Pid and log file of the server in target ``pod``."""
    return {ext: directory / f"target-{pod}.{ext}" for ext in ("pid", "log")}


def write_state(state: LabState, root: Path = STATE_ROOT) -> None:
    """Write ``lab.json`` atomically (a reader never sees half a file)."""
    directory = state_dir(state.spec.prefix, root)
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "spec": spec_to_dict(state.spec),
        "processes": [asdict(p) for p in state.processes],
        "complete": state.complete,
    }
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".lab.json.")
    try:
        os.fchmod(fd, 0o644)  # status and load_spec work without root
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _process(raw: Any) -> ProcessRecord:
    if not isinstance(raw, dict):
        raise ValueError("process record is not an object")
    kind, pod, netns, pid = raw.get("kind"), raw.get("pod"), raw.get("netns"), raw.get("pid")
    container = raw.get("container")
    if kind not in PROCESS_KINDS or not isinstance(pod, str) or not isinstance(container, str):
        raise ValueError(f"bad process record {raw!r}")
    if not isinstance(netns, str) or not isinstance(pid, int) or pid <= 1:
        raise ValueError(f"bad process record {raw!r}")
    return ProcessRecord(kind=kind, pod=pod, netns=netns, pid=pid, container=container)


def read_state(prefix: str, root: Path = STATE_ROOT) -> LabState | None:
    """The recorded state of lab ``prefix``; None when there is none.

    A corrupt or foreign ``lab.json`` is a LabError naming the file, since
    guessing would risk removing the wrong things.
    """
    path = state_dir(prefix, root) / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LabError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        spec = spec_from_dict(data["spec"])
        processes = tuple(_process(p) for p in data.get("processes", []))
        complete = bool(data.get("complete", False))
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(
            f"{path} is not a lab state this version understands ({exc}); "
            "remove the lab's namespaces by hand and delete the directory"
        ) from exc
    if spec.prefix != prefix:
        raise LabError(f"{path} records prefix {spec.prefix!r}, not {prefix!r}")
    return LabState(spec=spec, processes=processes, complete=complete)


def load_spec(prefix: str = DEFAULT_PREFIX, root: Path = STATE_ROOT) -> LabSpec | None:
    """The spec of the running lab with ``prefix``, or None when no lab is recorded."""
    state = read_state(prefix, root)
    return state.spec if state else None
