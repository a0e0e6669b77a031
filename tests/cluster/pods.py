"""Meridio pods as the operator (v1.2.8) and the Helm chart create them, for the lab's roles.

Names, labels, container names, env and security contexts follow Meridio's
templates (../shared/meridio/pods): the operator names the LB/FE Deployment
``stateless-lb-frontend-<attractor>`` (labels ``app`` = that name,
``app-type=stateless-lb-frontend``) and the proxy DaemonSet ``proxy-<conduit>``
(label ``app`` only); the Helm chart's LB pod has the containers
``stateless-lb``, ``nsc`` and ``fe``. Both have a privileged ``sysctl-init``
init container and NET_ADMIN in their containers, which matters for Pod
Security: admission evaluates the whole pod on every ephemeral-container update.
"""

from __future__ import annotations

import hashlib
from typing import Any

REG = "registry.nordix.org/cloud-native/meridio"


def _sysctl_init() -> dict[str, Any]:
    return {
        "name": "sysctl-init",
        "image": f"{REG}/init:v1.2.8",
        "securityContext": {"privileged": True},
        "command": ["/bin/sh"],
        "args": ["-c", "sysctl -w net.ipv4.conf.all.forwarding=1"],
    }


def _caps(*add: str, user: int | None = None) -> dict[str, Any]:
    sc: dict[str, Any] = {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["all"]},
    }
    if add:
        sc["capabilities"]["add"] = list(add)
    if user is not None:
        sc["runAsUser"] = sc["runAsGroup"] = user
    return sc


def meridio_pod(
    namespace: str,
    lab_name: str,
    role: str,
    node: str,
    trench: str = "trench-a",
    legacy: bool = False,
) -> dict[str, Any]:
    """A Pod manifest (for create) as the operator or, with ``legacy``, the Helm chart makes it."""
    h = hashlib.sha256(f"{namespace}/{lab_name}".encode()).hexdigest()
    rs, suffix = h[:10], h[10:15]
    conduit = "conduit-a"
    init = [_sysctl_init()]
    labels: dict[str, str]
    if role == "lb-fe":
        lb_env = [
            {"name": "NSM_SERVICE_NAME", "value": f"{conduit}.{trench}.{namespace}"},
            {"name": "NSM_CONDUIT_NAME", "value": conduit},
            {"name": "NSM_TRENCH_NAME", "value": trench},
        ]
        fe_env = [
            {"name": "NFE_TRENCH_NAME", "value": trench},
            {"name": "NFE_ATTRACTOR_NAME", "value": "attractor-a"},
        ]
        nsc = {"name": "nsc", "image": "ghcr.io/networkservicemesh/cmd-nsc:v1.11.1"}
        nsc["securityContext"] = _caps(user=10000)
        if legacy:
            name = f"load-balancer-{trench}-{rs}-{suffix}"
            labels = {"app": f"load-balancer-{trench}", "pod-template-hash": rs}
            containers = [
                {
                    "name": "stateless-lb",
                    "image": f"{REG}/stateless-lb:v1.0.0",
                    "env": lb_env,
                    "securityContext": _caps("NET_ADMIN", "IPC_LOCK"),
                },
                nsc,
                {
                    "name": "fe",
                    "image": f"{REG}/frontend:v1.0.0",
                    "env": fe_env,
                    "securityContext": _caps("NET_ADMIN", "NET_BIND_SERVICE"),
                },
            ]
        else:
            app = "stateless-lb-frontend-attractor-a"
            name = f"{app}-{rs}-{suffix}"
            labels = {"app": app, "app-type": "stateless-lb-frontend", "pod-template-hash": rs}
            containers = [
                {
                    "name": "stateless-lb",
                    "image": f"{REG}/stateless-lb:v1.2.8",
                    "env": lb_env,
                    "securityContext": _caps("NET_ADMIN", "IPC_LOCK"),
                },
                nsc,
                {
                    "name": "frontend",
                    "image": f"{REG}/frontend:v1.2.8",
                    "env": fe_env,
                    "securityContext": _caps("NET_ADMIN", "NET_BIND_SERVICE"),
                },
            ]
    elif role == "proxy":
        app = f"proxy-{trench}" if legacy else f"proxy-{conduit}"
        name = f"{app}-{suffix}"
        labels = {"app": app, "controller-revision-hash": rs, "pod-template-generation": "1"}
        containers = [
            {
                "name": "proxy",
                "image": f"{REG}/proxy:v1.2.8",
                "env": [
                    {"name": "NSM_SERVICE_NAME", "value": f"proxy.{conduit}.{trench}.{namespace}"},
                    {"name": "NSM_TRENCH", "value": trench},
                    {"name": "NSM_CONDUIT", "value": conduit},
                ],
                "securityContext": _caps("NET_ADMIN", "DAC_OVERRIDE", "NET_RAW", "SYS_PTRACE"),
            }
        ]
    elif role == "target":
        app = "target-" + lab_name.rsplit("-", maxsplit=1)[-1][:1]
        name = f"{app}-{rs}-{suffix}"
        labels = {"app": app, "pod-template-hash": rs}
        init = []
        containers = [
            {
                "name": "example-target",
                "image": f"{REG}/example-target:latest",
                "securityContext": {"privileged": True},
            },
            {
                "name": "tapa",
                "image": f"{REG}/tapa:v1.2.8",
                "env": [{"name": "MERIDIO_SOCKET", "value": "/var/lib/meridio/ambassador.sock"}],
                "securityContext": _caps(user=10000),
            },
        ]
    else:
        name = lab_name
        labels = {"app": lab_name.rsplit("-", 1)[0]}
        init = []
        containers = [{"name": lab_name.split("-", maxsplit=1)[0], "image": f"{REG}/other:1"}]
    spec: dict[str, Any] = {
        "nodeName": node,
        "containers": containers,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 30,
        "enableServiceLinks": False,
    }
    if init:
        spec["initContainers"] = init
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }
