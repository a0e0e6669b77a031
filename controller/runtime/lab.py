"""The running lab's pods as a local runtime: ``--lab [POD...]`` of every command.

Why here: the lab (controller/lab) builds pods; this maps a running lab to what the
services need -- pod references with roles and the container each agent joins, as an
ephemeral container would in a cluster -- so the CLI, the services and tests share it.
"""

from __future__ import annotations

from collections.abc import Sequence

from meridio_debug.controller.errors import LabError
from meridio_debug.controller.lab import containers, load_spec
from meridio_debug.controller.lab.state import read_state, state_dir
from meridio_debug.controller.runtime import PodRef
from meridio_debug.controller.runtime.local import EphemeralTarget, LocalRuntime, select_pods


def lab_pods(prefix: str) -> list[PodRef]:
    """The running lab's pods (gateway included), with roles; LabError when no lab is up."""

    spec = load_spec(prefix)
    if spec is None:
        raise LabError(f"no lab with prefix {prefix!r} is up: run `meridio-debug lab up` first")
    return [PodRef(name=p.name, role=p.role, location=p.netns, runtime="lab") for p in spec.pods]


def lab_targets(prefix: str) -> dict[str, EphemeralTarget]:
    """Pod name -> the container its agent joins, as an ephemeral container would.

    The same container a cluster's agent targets (lab/containers.AGENT_TARGET,
    runtime/k8s_spec.target_container): ``frontend`` in an LB/FE pod, so the
    agent sees bird's processes and not nfqlb's, as in Meridio.
    """

    state = read_state(prefix)
    if state is None:
        return {}
    directory = state_dir(prefix)
    pids = {(r.pod, r.container): r.pid for r in state.processes}
    out: dict[str, EphemeralTarget] = {}
    for pod in state.spec.pods:
        name = containers.AGENT_TARGET[pod.role]
        pid = pids.get((pod.name, name))
        if pid is not None:
            out[pod.name] = EphemeralTarget(
                container=name,
                pid=pid,
                shm=str(containers.shm_dir(directory, pod.name)),
                pod_containers=containers.CONTAINERS[pod.role],
            )
    return out


def lab_runtime(prefix: str, names: Sequence[str]) -> LocalRuntime:
    """A local runtime over the named lab pods (all Meridio pods when none are named)."""
    pods = lab_pods(prefix)
    chosen = select_pods(pods, names) if names else [p for p in pods if p.role != "gateway"]
    return LocalRuntime(chosen, targets=lab_targets(prefix))
