"""The lab's pods as pods: containers with their own PID and mount namespaces.

Why: a Meridio pod is one network namespace shared by containers that do not
share their processes (no ``shareProcessNamespace``), plus one /dev/shm per
pod. An agent injected as an ephemeral container targeting ``frontend`` sees
bird but not the ``stateless-lb`` container's nfqlb. The lab builds pods the
same way so that whatever the agent gets right here it gets right in a
cluster (design.md, "Pods as they are").

Layout (names as in Meridio's pod templates, ../shared/meridio/pods)::

    gateway   gateway                    bird (not a Meridio pod)
    lb-fe     stateless-lb, frontend     nfqlb flowlb | bird
    proxy     proxy                      (idle: the lab configures the proxy itself)
    target    example-target, tapa       the target server | (idle: the stream is static)

PID 1 of each container is its program (bird in the foreground, the target
server, nfqlb flowlb). ``proxy``, ``tapa`` and, until nfqlb runs there,
``stateless-lb`` hold their container with ``sleep infinity`` exec'd through
a symlink named after Meridio's binary, so ``ps`` and the agent show
``proxy``/``tapa``: the lab does what those daemons would do (links,
addresses, routes) with ``ip`` at build time, and says so here rather than
pretending. Each container's PID 1 carries ``MERIDIO_DEBUG_LAB_CONTAINER=
<state dir>/<pod>/<container>`` in its environment: that is how ``down`` and
``status`` recognise the lab's own processes (never by name).

Killing a container's PID 1 ends every process of its PID namespace (the
kernel does that), which is how ``down`` stops a container: SIGKILL, since a
PID 1 without a handler ignores SIGTERM from outside (nfqlb flowlb does).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meridio_debug.controller.errors import LabError
from meridio_debug.controller.lab import _system as system
from meridio_debug.controller.lab.state import ProcessKind

MARKER_ENV = "MERIDIO_DEBUG_LAB_CONTAINER"
STARTER = Path(__file__).with_name("_container_start.py")

# Containers per role, in start order; and the one an agent targets (as
# runtime/k8s_spec.target_container picks in a cluster: bird, the proxy, the app).
CONTAINERS: Mapping[str, tuple[str, ...]] = {
    "gateway": ("gateway",),
    "lb-fe": ("stateless-lb", "frontend"),
    "proxy": ("proxy",),
    "target": ("example-target", "tapa"),
}
AGENT_TARGET: Mapping[str, str] = {
    "gateway": "gateway",
    "lb-fe": "frontend",
    "proxy": "proxy",
    "target": "example-target",
}


@dataclass(frozen=True)
class ContainerSpec:
    """One container to start: where, what, and as which program."""

    pod: str
    name: str
    netns: str  # the pod's namespace name (/run/netns/NAME)
    kind: ProcessKind  # what PID 1 runs
    exe: str  # absolute path exec'd as PID 1
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


def marker(directory: Path, pod: str, container: str) -> str:
    """The value of MARKER_ENV for a container of this lab."""
    return f"{directory}/{pod}/{container}"


def shm_dir(directory: Path, pod: str) -> Path:
    """The host directory that is ``pod``'s /dev/shm (one per pod, shared by its containers)."""
    return directory / "shm" / pod


def log_path(directory: Path, pod: str, container: str) -> Path:
    return directory / f"{pod}.{container}.log"


def idle(directory: Path, pod: str, name: str, netns: str) -> ContainerSpec:
    """A container whose PID 1 is ``sleep infinity`` called ``name`` (see module docstring)."""
    sleep = shutil.which("sleep") or "/bin/sleep"
    link = directory / "bin" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(sleep)
    return ContainerSpec(pod, name, netns, "idle", str(link), (str(link), "infinity"))


def container_marker_of(pid: int) -> str | None:
    """MARKER_ENV of ``pid``'s initial environment; None when absent or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{MARKER_ENV}=".encode()
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def start(
    specs: Sequence[ContainerSpec], directory: Path, python: str = sys.executable
) -> list[int]:
    """Start ``specs`` (one helper process for all); the host pid of each PID 1.

    Raises LabError naming the first container that could not start; the
    ones that did start are running then (their pids are in the message's
    cause) -- the caller records nothing and ``down`` finds them by marker.
    """
    if not specs:
        return []
    request = []
    for s in specs:
        shm = shm_dir(directory, s.pod)
        shm.mkdir(parents=True, exist_ok=True)
        shm.chmod(0o1777)
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": s.pod,
            **s.env,
            MARKER_ENV: marker(directory, s.pod, s.name),
        }
        request.append(
            {
                "netns": str(system.NETNS_DIR / s.netns),
                "exe": s.exe,
                "argv": list(s.argv),
                "env": env,
                "log": str(log_path(directory, s.pod, s.name)),
                "shm": str(shm),
            }
        )
    out = system.run(
        [python, "-I", "-S", str(STARTER)],
        what="start lab containers",
        stdin=json.dumps(request),
        timeout=60,
    )
    try:
        replies = json.loads(out)
    except ValueError as exc:
        raise LabError(f"start lab containers: unreadable answer {out[:200]!r}") from exc
    pids: list[int] = []
    for s, reply in zip(specs, replies, strict=True):
        if "pid" not in reply:
            raise LabError(f"container {s.name} of {s.pod}: {reply.get('error', 'not started')}")
        pids.append(int(reply["pid"]))
    return pids


def exec_argv(nsenter: str, pid: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside the container whose PID 1 is ``pid`` (netns, mounts, PID namespace).

    ``nsenter -t PID -n -m -p`` is what ``kubectl exec`` amounts to here: the
    command sees the container's /dev/shm and processes, as nfqlb's ``init``,
    ``activate`` and ``flow-set`` must when the stateless-lb runs them.
    """
    return [nsenter, "-t", str(pid), "-n", "-m", "-p", "--", *argv]


def last_log_line(directory: Path, pod: str, container: str) -> str:
    """The container's last log line (why it died), or ''."""
    try:
        lines = log_path(directory, pod, container).read_text(errors="replace").split("\n")
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1] if lines else ""


def alive_and_ours(pid: int, directory: Path, key: str | None = None) -> bool:
    """Whether ``pid`` runs and is PID 1 of a container of this lab (``key``: that one exactly)."""
    if not system.pid_alive(pid):
        return False
    found = container_marker_of(pid)
    if found is None:
        # Without root /proc/PID/environ is unreadable: status then trusts the pid.
        return not os.access(f"/proc/{pid}/environ", os.R_OK) and os.geteuid() != 0
    if key is not None:
        return found == key
    return found.startswith(f"{directory}/")


def find_container(netns: str, container: str) -> tuple[int, Path] | None:
    """(PID 1, the pod's shm directory) of the lab container ``container`` in namespace ``netns``.

    For code that starts agents in lab pods from a pod name alone (the stand-in
    kubelet of tests/cluster, which knows the namespace and the
    ``targetContainerName``). None when no such container runs.
    """
    for pid in sorted(system.pids_in_namespaces([netns])):
        found = container_marker_of(pid)
        if found is None or not system.pid_alive(pid):
            continue
        rest, _, name = found.rpartition("/")
        directory, _, pod = rest.rpartition("/")
        if name == container:
            return pid, shm_dir(Path(directory), pod)
    return None
