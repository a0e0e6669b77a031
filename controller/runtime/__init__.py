"""Runtimes: where agents run and how the controller reaches them.

One interface, several implementations, the same services above
it (like httpx's transports, or Inspektor Gadget's local and gRPC runtimes):

- ``local``: network namespaces on this host (``--netns``, ``--netns-pid``) and
  the lab (``--lab``, ``lab.py``): the agent is started inside the namespace as a
  child process and reached over a unix socket.
- ``kubernetes``: ephemeral containers in real pods, reached through the API
  server's port-forward or directly with mutual TLS (``tls.py``).
- ``reuse``: wraps either, so one run asks each pod's agent many questions.

A runtime resolves what the user named into ``PodRef`` objects and opens an
``AgentClient`` per pod. Opening one pod may fail (a finding, MDB002) without
stopping the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from meridio_debug.controller.wire.client import AgentClient, Snapshot

ROLES = ("gateway", "lb-fe", "proxy", "target", "unknown")


@dataclass(frozen=True, slots=True)
class PodRef:
    """A pod (or plain namespace) to debug, as the runtime knows it."""

    name: str
    role: str  # one of ROLES
    location: str  # netns name, "pid:N", or "<namespace>/<pod>" in a cluster
    runtime: str  # "local", "lab", "kubernetes"


class Runtime(Protocol):
    """Resolves pods and opens agents."""

    def pods(self) -> list[PodRef]:
        """The pods this run covers, in a stable order."""
        ...

    def open(self, pod: PodRef) -> AbstractAsyncContextManager[AgentClient]:
        """Start or reuse the pod's agent and connect; raise RuntimeUnavailable on failure."""
        ...


@runtime_checkable
class OneShotSnapshots(Protocol):
    """A runtime that can take a pod's snapshot without keeping an agent for it.

    The local runtime does (a one-shot agent per pod, bounded in number: see
    ``LocalRuntime.snapshot_once``); a command that needs nothing but snapshots
    uses it when the runtime has it, ``open`` otherwise.
    """

    async def snapshot_once(self, pod: PodRef, sections: Sequence[str] = ()) -> Snapshot:
        """The pod's snapshot (the Snapshot RPC's answer); RuntimeUnavailable on failure."""
        ...
