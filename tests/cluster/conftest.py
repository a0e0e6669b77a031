"""The cluster tier's shared fixture: one lab and one stand-in API server per module.

Pods of namespace ``red`` are operator-named Meridio pods mapped onto the
lab's namespaces; the stand-in's kubelet starts the real agent inside them,
and port-forward reaches it there. ``blue`` holds the same pods under the
legacy (Helm) names, with Pod Security ``baseline``; ``green`` is for
destructive tests (pods deleted).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meridio_debug.controller import lab
from meridio_debug.controller.runtime.kubernetes import KubeOptions, KubernetesRuntime
from tests.cluster.apiserver import StandInApiServer

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]


@dataclass
class Cluster:
    server: StandInApiServer
    kubeconfig: Path
    spec: Any
    work: Path

    def runtime(self, namespace: str = "red", **kw: Any) -> KubernetesRuntime:
        progress: list[tuple[str, str, str]] = kw.pop("events", [])
        tls = kw.pop("tls", None)
        opts = KubeOptions(namespace=namespace, kubeconfig=str(self.kubeconfig), **kw)
        return KubernetesRuntime(opts, progress=lambda *e: progress.append(e), tls=tls)

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args, "--kubeconfig", str(self.kubeconfig)],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*CLI, *args, "--kubeconfig", str(self.kubeconfig)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    # pid- and module-unique: each module of the tier has its own lab
    tag = sum(map(ord, request.module.__name__)) % 10
    prefix = f"mdk{os.getpid() % 1000}{tag}-"
    spec = lab.build_spec(prefix)
    work = tmp_path_factory.mktemp("standin")
    server = StandInApiServer(work)
    try:
        lab.up(spec)
        server.start()
        triples = [(p.name, p.role, p.netns) for p in spec.pods]
        server.add_lab(triples, "red")
        server.add_lab(triples, "blue", legacy=True)
        server.add_lab(triples, "green")
        server.psa["blue"] = "baseline"
        yield Cluster(server, server.kubeconfig(work / "kubeconfig"), spec, work)
    finally:
        server.stop()
        lab.down(prefix)
