"""Pure Kubernetes logic of the runtime: which pods are Meridio's, what to inject, what a status means.

Why a module without the client: everything here decides something from a
pod's JSON (camelCase, as the API server sends it) and returns plain data, so
it is testable in unit tests on recorded objects and shared by the runtime
(runtime/kubernetes.py, the only module that imports ``kubernetes``) and the
``agents`` command.

Decisions, with the reason next to each:

- **Discovery** accepts both naming schemes of meridio-reference.md §1: the
  operator's (``app=stateless-lb-frontend-<attractor>``,
  ``app-type=stateless-lb-frontend``, ``proxy-<conduit>``) and the Helm/legacy
  one (``load-balancer-<trench>``, ``meridio-proxy-*``, containers
  ``load-balancer``/``fe``); containers decide when labels do not (a pod with
  ``stateless-lb``+``frontend`` is an LB/FE whatever its name). A target is
  any pod with a ``tapa`` container. NSP, IPAM and NSE pods hold no data-plane
  state and are left out.
- **Agent names** are ``meridio-debug-<8 hex of sha256(image, profile,
  transport, CA)>`` plus ``-2``, ``-3``, ... once an earlier one terminated:
  deterministic, so a second run finds and reuses a running agent instead of
  piling up containers (peers.md pain points 1-2); an ephemeral container can
  never be restarted, so a terminated name is never reused.
- **The agent's port** inside the pod is derived from its name (41000-48999):
  a new agent never collides with an older one that still holds its port.
- **targetContainerName** is the container whose processes the agent must
  see (bird in ``frontend``/``fe``; nfqlb in ``stateless-lb``/``load-balancer``;
  ``proxy``; the target's app): the agent shares its PID namespace when the
  runtime supports it.
- **securityContext** is explicit (``runAsUser: 0``, ``runAsNonRoot: false``):
  a pod-level ``runAsNonRoot`` would otherwise keep the agent from starting
  (kubernetes/kubernetes#113006), and capabilities only work for root without
  ambient capabilities.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def _package_version() -> str:
    try:
        return version("meridio-debug")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
        return "0.0.0"


AGENT_NAME_PREFIX = "meridio-debug-"
# The agent image is released with the same version as the package
# (images/agent.Dockerfile); controller and agent speak the same protocol.
IMAGE_REPOSITORY = "ghcr.io/nordix/meridio-debug-agent"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{_package_version()}"
ANNOTATION = "meridio-debug.nordix.org/agents"
PROFILES = ("netadmin", "privileged")
NETADMIN_CAPS = ("NET_ADMIN", "NET_RAW", "SYS_PTRACE")
CLIENT_CA_ENV = "MERIDIO_DEBUG_CLIENT_CA"
MAX_AGENTS_PER_POD = 10
PORT_BASE, PORT_SPAN = 41000, 8000

# Waiting reasons after which a container never runs without someone fixing
# the pod: fail at once instead of waiting for the timeout. Not ErrImagePull /
# ImagePullBackOff: the kubelet keeps retrying the pull (a registry that was
# down, a secret added later), so such an agent is still starting, is reused,
# and fails only at --start-timeout, with PULL_WAITING's hint.
PULL_WAITING = ("ErrImagePull", "ImagePullBackOff")
FATAL_WAITING = {
    "InvalidImageName": "the image name is invalid",
    "ErrImageNeverPull": "the image is not on the node and imagePullPolicy is Never",
    "CreateContainerConfigError": "the container config is invalid",
    "CreateContainerError": "the container runtime cannot create the container",
    "RunContainerError": "the container runtime cannot start the container",
}


@dataclass(frozen=True, slots=True)
class MeridioPod:
    """A Meridio pod found in a namespace: role, trench (when known) and target container."""

    namespace: str
    name: str
    role: str  # lb-fe, proxy, target
    trench: str | None
    target_container: str | None
    pod_ip: str | None
    phase: str


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(pod.get("spec", {}).get("containers") or [])


def _env(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in container.get("env") or [] if "name" in e}


def classify(pod: Mapping[str, Any]) -> str | None:
    """The pod's Meridio role (``lb-fe``, ``proxy``, ``target``) or None for other pods."""
    meta = pod.get("metadata", {})
    labels: Mapping[str, str] = meta.get("labels") or {}
    name: str = meta.get("name", "")
    app = labels.get("app", "")
    names = {c.get("name") for c in _containers(pod)}
    if (
        labels.get("app-type") == "stateless-lb-frontend"
        or app.startswith("stateless-lb-frontend-")
        or bool(names & {"stateless-lb", "load-balancer"} and names & {"frontend", "fe"})
        or name.startswith(("load-balancer-", "meridio-load-balancer-"))
    ):
        return "lb-fe"
    if (
        app.startswith("proxy-")
        or name.startswith("meridio-proxy-")
        or ("proxy" in names and labels.get("app-type", "proxy") == "proxy")
    ):
        return "proxy"
    if "tapa" in names:
        return "target"
    return None


def _trench_from_service(service: str, proxy: bool) -> str | None:
    # LB: <conduit>.<trench>.<ns>; proxy: proxy.<conduit>.<trench>.<ns>
    parts = service.split(".")
    if proxy and len(parts) >= 4 and parts[0] == "proxy":
        return parts[2]
    if not proxy and len(parts) >= 3:
        return parts[-2]
    return None


def trench_of(pod: Mapping[str, Any], role: str) -> str | None:
    """The trench a pod belongs to, from its label or environment; None when unknown.

    Targets choose their trench at run time (TAPA ``Open``), so a target
    without a ``trench`` label or ``MERIDIO_TRENCH`` is unknown, not foreign.
    """
    labels: Mapping[str, str] = pod.get("metadata", {}).get("labels") or {}
    if labels.get("trench"):
        return labels["trench"]
    for c in _containers(pod):
        env = _env(c)
        if env.get("NSM_TRENCH_NAME"):
            return env["NSM_TRENCH_NAME"]
        if env.get("MERIDIO_TRENCH"):
            return env["MERIDIO_TRENCH"]
        if env.get("NSM_SERVICE_NAME"):
            found = _trench_from_service(env["NSM_SERVICE_NAME"], role == "proxy")
            if found:
                return found
    name: str = pod.get("metadata", {}).get("name", "")
    if role == "lb-fe" and name.startswith("load-balancer-"):
        # Helm: load-balancer-<trench>-<replicaset hash>-<pod hash>
        return name[len("load-balancer-") :].rsplit("-", 2)[0] or None
    return None


def target_container(pod: Mapping[str, Any], role: str) -> str | None:
    """The container whose processes the agent must see (bird/nfqlb/the proxy/the app)."""
    names = [c.get("name", "") for c in _containers(pod)]
    prefs = {
        "lb-fe": ("frontend", "fe", "stateless-lb", "load-balancer"),
        "proxy": ("proxy",),
        "target": (*(n for n in names if n != "tapa"), "tapa"),
    }.get(role, ())
    for want in prefs:
        if want in names:
            return str(want)
    return str(names[0]) if names else None


def meridio_pod(pod: Mapping[str, Any]) -> MeridioPod | None:
    role = classify(pod)
    if role is None:
        return None
    meta = pod.get("metadata", {})
    status = pod.get("status", {})
    return MeridioPod(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        role=role,
        trench=trench_of(pod, role),
        target_container=target_container(pod, role),
        pod_ip=status.get("podIP"),
        phase=status.get("phase", "Unknown"),
    )


ROLE_ORDER = {"lb-fe": 0, "proxy": 1, "target": 2}


def discover(
    pods: Sequence[Mapping[str, Any]], trench: str | None = None, names: Sequence[str] = ()
) -> list[MeridioPod]:
    """Meridio pods among ``pods``, LB/FE first, then proxies, then targets, each by name.

    ``trench`` keeps pods of that trench and those whose trench is unknown;
    ``names`` keeps only pods with these names (all of them must be Meridio pods).
    Pods that are deleting (``deletionTimestamp``) are left out.
    """
    found = []
    for raw in pods:
        if raw.get("metadata", {}).get("deletionTimestamp"):
            continue
        mp = meridio_pod(raw)
        if mp is None:
            continue
        if trench and mp.trench not in (None, trench):
            continue
        found.append(mp)
    if names:
        wanted = set(names)
        found = [p for p in found if p.name in wanted]
    return sorted(found, key=lambda p: (ROLE_ORDER.get(p.role, 9), p.name))


# --- agents -------------------------------------------------------------------------------


def agent_key(image: str, profile: str, transport: str, ca_fingerprint: str = "") -> str:
    """8 hex characters naming an agent flavour: same inputs, same name, reusable agent."""
    text = "\0".join((image, profile, transport, ca_fingerprint))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def agent_name(key: str, generation: int = 1) -> str:
    base = f"{AGENT_NAME_PREFIX}{key}"
    return base if generation <= 1 else f"{base}-{generation}"


def agent_port(name: str) -> int:
    """The agent's TCP port inside the pod, derived from its name (see module docstring)."""
    digest = hashlib.sha256(name.encode()).digest()
    return PORT_BASE + int.from_bytes(digest[:4], "big") % PORT_SPAN


def generation_of(name: str, key: str) -> int | None:
    """1 for ``meridio-debug-<key>``, N for ``...-<key>-N``, None for another name."""
    base = agent_name(key)
    if name == base:
        return 1
    if name.startswith(base + "-") and name[len(base) + 1 :].isdigit():
        return int(name[len(base) + 1 :])
    return None


# agent/ephemeral.py TARGET_CONTAINER_ENV (the controller does not import the agent).
TARGET_CONTAINER_ENV = "MERIDIO_DEBUG_TARGET_CONTAINER"


def agent_container(
    name: str,
    *,
    image: str,
    profile: str,
    target: str | None,
    idle_timeout: float,
    direct: bool,
    client_ca_pem: str | None = None,
) -> dict[str, Any]:
    """The ephemeral container spec of an agent (camelCase, as sent in the PATCH).

    Only fields the API allows for ephemeral containers: no ports, probes,
    resources or lifecycle (422 otherwise). In direct mode the agent listens
    on all addresses, else on 127.0.0.1 (reached by port-forward); both
    require client certificates signed by the controller's CA (every
    container of the pod shares its loopback, so port-forward mode is no
    exception), whose *certificate* (public) travels in an env var; the agent
    makes its own key at start (no private key in the pod spec).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; one of {', '.join(PROFILES)}")
    port = agent_port(name)
    listen = f"tcp:[::]:{port}" if direct else f"tcp:127.0.0.1:{port}"
    args = ["--listen", listen, "--idle-timeout", f"{idle_timeout:g}", "--log-level", "INFO"]
    if not client_ca_pem:
        raise ValueError("an agent needs the controller's CA certificate (mutual TLS)")
    args += ["--tls-client-ca-env", CLIENT_CA_ENV]
    env: list[dict[str, Any]] = [{"name": CLIENT_CA_ENV, "value": client_ca_pem}]
    security: dict[str, Any] = {"runAsUser": 0, "runAsNonRoot": False}
    if profile == "privileged":
        security["privileged"] = True
    else:
        security["capabilities"] = {"add": list(NETADMIN_CAPS)}
    spec: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "securityContext": security,
        "stdin": False,
        "tty": False,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if target:
        spec["targetContainerName"] = target
        # The agent cannot learn its target's name from inside; it puts it on its sections.
        env.append({"name": TARGET_CONTAINER_ENV, "value": target})
    if env:
        spec["env"] = env
    return spec


def port_of(container: Mapping[str, Any]) -> int | None:
    """The port an agent container listens on, read from its ``--listen`` argument."""
    args = list(container.get("args") or [])
    for i, arg in enumerate(args[:-1]):
        if arg == "--listen":
            m = re.search(r":(\d+)$", args[i + 1])
            return int(m.group(1)) if m else None
    return None


@dataclass(frozen=True, slots=True)
class AgentState:
    """One agent container of a pod as the API reports it.

    ``state``: ``running``; ``starting`` (no status yet, or creating);
    ``terminated`` (exited, normally the idle timeout: exit code 0);
    ``zombie`` (never runs again and never ran usefully: image pull failure,
    crash, bad config). Terminated and zombie containers stay in the pod spec
    until the pod is deleted: ephemeral containers cannot be removed.
    """

    pod: str
    name: str
    image: str
    state: str
    reason: str
    started_at: str | None
    finished_at: str | None
    port: int | None


def container_state(status: Mapping[str, Any] | None) -> tuple[str, str, str | None, str | None]:
    """(state, reason, startedAt, finishedAt) of a container status (see AgentState)."""
    if not status:
        return "starting", "no status yet", None, None
    st = status.get("state") or {}
    if "running" in st:
        return "running", "", (st["running"] or {}).get("startedAt"), None
    if "terminated" in st:
        t = st["terminated"] or {}
        code = t.get("exitCode", 0)
        reason = t.get("reason") or ("Completed" if code == 0 else "Error")
        text = f"{reason}, exit code {code}"
        if t.get("message"):
            text += f": {str(t['message']).strip().splitlines()[-1]}"
        return (
            "terminated" if code == 0 else "zombie",
            text,
            t.get("startedAt"),
            t.get("finishedAt"),
        )
    w = st.get("waiting") or {}
    reason = w.get("reason", "Waiting")
    message = w.get("message", "")
    text = f"{reason}: {message}" if message else reason
    if reason in FATAL_WAITING:
        return "zombie", text, None, None
    return "starting", text, None, None


def agents_of(pod: Mapping[str, Any]) -> list[AgentState]:
    """Every meridio-debug agent container of a pod, in spec order."""
    name = pod.get("metadata", {}).get("name", "")
    statuses = {
        s.get("name"): s for s in pod.get("status", {}).get("ephemeralContainerStatuses") or []
    }
    out = []
    for c in pod.get("spec", {}).get("ephemeralContainers") or []:
        cname = c.get("name", "")
        if not cname.startswith(AGENT_NAME_PREFIX):
            continue
        state, reason, started, finished = container_state(statuses.get(cname))
        out.append(
            AgentState(
                name, cname, c.get("image", ""), state, reason, started, finished, port_of(c)
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do for one pod: reuse or wait for ``name``, or inject it."""

    name: str
    inject: bool
    existing: AgentState | None


def next_name(pod: Mapping[str, Any], key: str) -> str:
    """The next unused agent name of this flavour: a name is taken forever once used."""
    used = [generation_of(a.name, key) for a in agents_of(pod)]
    taken = {c.get("name") for c in pod.get("spec", {}).get("ephemeralContainers") or []}
    generation = max((g for g in used if g is not None), default=0) + 1
    while agent_name(key, generation) in taken:
        generation += 1
    return agent_name(key, generation)


def plan(pod: Mapping[str, Any], key: str) -> Plan:
    """Reuse the newest running (or starting) agent of this flavour, else inject the next name."""
    ours = [(g, a) for a in agents_of(pod) if (g := generation_of(a.name, key)) is not None]
    for _g, a in sorted(ours, key=lambda x: x[0], reverse=True):
        if a.state in ("running", "starting"):
            return Plan(a.name, False, a)
    return Plan(next_name(pod, key), True, None)


def annotation_patch(pod: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch adding ``record`` to the pod's agents annotation (labels untouched)."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    try:
        current = json.loads(annotations.get(ANNOTATION, "[]"))
        if not isinstance(current, list):
            current = []
    except ValueError:
        current = []
    current = [r for r in current if isinstance(r, dict) and r.get("name") != record.get("name")]
    current.append(dict(record))
    return {"metadata": {"annotations": {ANNOTATION: json.dumps(current, sort_keys=True)}}}


def annotation_records(pod: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The agents annotation by container name (empty when absent or unreadable)."""
    text = (pod.get("metadata", {}).get("annotations") or {}).get(ANNOTATION)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, list):
        return {}
    return {r["name"]: r for r in data if isinstance(r, dict) and isinstance(r.get("name"), str)}


# --- API errors ----------------------------------------------------------------------------

_RBAC_RE = re.compile(r'cannot (\w+) resource "([^"]+)"(?: in API group "[^"]*")?')


def status_message(body: str | bytes | None) -> str:
    """The ``message`` of a Kubernetes Status body, or the body itself."""
    if not body:
        return ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])
    return text.strip()


_EMPTY_FORBIDDEN_RE = re.compile(r'^pods "[^"]*" is forbidden: ?$')


def rbac_denial(message: str, request: tuple[str, str] | None = None) -> tuple[str, str] | None:
    """(verb, resource) an RBAC 403 message says is missing, or None.

    Kubernetes 1.35+ refuses a websocket port-forward whose ``create`` on
    pods/portforward is missing with ``pods "x" is forbidden: `` and no reason;
    ``request`` (the verb and resource of the refused request) names it then.
    """
    m = _RBAC_RE.search(message)
    if m:
        return (m.group(1), m.group(2))
    if request is not None and _EMPTY_FORBIDDEN_RE.match(message.strip() + " "):
        return request
    return None
