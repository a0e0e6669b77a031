"""Bring the lab up and take it down.

Why this shape:

- Each namespace is configured by a few ``ip -n NS -batch -`` runs (one exec
  for dozens of changes) with the text from ``render``; namespaces are
  configured in parallel. controller/ may not use pyroute2, and ``ip`` is
  what a human would type to reproduce or repair a step.
- ``lab.json`` is written *before* anything is created and updated as
  processes start, so a crash at any point leaves enough behind for
  ``down`` to remove everything. A failing ``up`` removes what it made
  itself before raising a one-line LabError.
- ``up`` is idempotent: on a complete lab whose namespaces and processes are
  all there it returns without touching anything; a half-built or broken
  one (namespace gone, bird dead, ``up`` interrupted) is removed and built
  again, which is quicker and more predictable than repairing in place.
- With nfqlb (the default) the ``stateless-lb`` container of each LB/FE pod runs ``nfqlb
  flowlb`` as Meridio's stateless-lb does (PID 1 of the container); the stream's shm, its
  targets and the trench's flow are then configured by ``nfqlb`` commands run inside that
  container (``_configure_nfqlb``), in the pod's /dev/shm.
- ``up`` returns once traffic can flow: BGP Established and BFD Up on every FE, the
  FEs' egress defaults in table 4096 and the gateway's VIP routes via every
  FE. Right after ``up``, ``traffic`` works.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

from meridio_debug.controller.errors import LabError
from meridio_debug.controller.lab import _system as system
from meridio_debug.controller.lab import containers, render
from meridio_debug.controller.lab.containers import ContainerSpec
from meridio_debug.controller.lab.prereq import (
    NFQLB_HINT,
    Tools,
    check_prerequisites,
    check_root_and_ip,
)
from meridio_debug.controller.lab.spec import LabSpec, Pod, check_prefix
from meridio_debug.controller.lab.state import (
    STATE_ROOT,
    LabState,
    ProcessRecord,
    bird_paths,
    read_state,
    state_dir,
    target_paths,
    write_state,
)
from meridio_debug.controller.lab.status import dataplane_problems

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT = 30.0


def up(
    spec: LabSpec,
    *,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    root: Path = STATE_ROOT,
    tools: Tools | None = None,
) -> None:
    """Build the lab described by ``spec`` (see lab.md) and wait until it carries traffic.

    Idempotent: a complete lab whose namespaces and processes all exist is
    left as it is, including changes made inside it on purpose (a route
    deleted to see what ``analyze`` says); ``down`` then ``up`` gives a fresh
    one. Raises LabError (one line) when a prerequisite is missing,
    when a lab with the same prefix but another layout is up, or when the
    build fails; in the last case everything made so far is removed first.
    """
    tools = tools or check_prerequisites(action="lab up")
    prefix = spec.prefix
    state = read_state(prefix, root)
    if state is not None:
        if state.spec != spec:
            old = state.spec
            sizes = (old.lbs, old.proxies, old.targets_per_proxy)
            if sizes == (spec.lbs, spec.proxies, spec.targets_per_proxy):
                what = "was built by another version of meridio-debug"
            else:
                what = (
                    f"is already up with another layout ({old.lbs} LBs, {old.proxies} proxies, "
                    f"{old.targets_per_proxy} targets per proxy)"
                )
            raise LabError(f"the lab with prefix {prefix!r} {what}: take it down first (lab down)")
        problems = _structural_problems(state, root)
        if state.complete and not problems:
            log.info("lab %s is already up", prefix)
            return
        log.warning(
            "lab %s is half-built (%s): removing and building it again",
            prefix,
            "; ".join(problems[:3]) or "up did not finish",
        )
        _teardown(prefix, state.spec, state.processes, tools.ip, root)
    elif leftovers := _leftover_namespaces(spec):
        log.warning("removing namespaces left from an earlier run: %s", ", ".join(leftovers))
        _teardown(prefix, spec, (), tools.ip, root)

    started = time.monotonic()
    try:
        _build(spec, tools, root, ready_timeout)
    except BaseException as exc:
        log.info("lab up failed; removing what was made")
        try:
            recorded = read_state(prefix, root)
            _teardown(prefix, spec, recorded.processes if recorded else (), tools.ip, root)
        except Exception as cleanup_exc:
            log.error("cleanup after failed lab up failed too: %s", cleanup_exc)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        detail = str(exc) if isinstance(exc, LabError) else f"{type(exc).__name__}: {exc}"
        raise LabError(f"lab up failed: {detail} (what it had made is removed)") from exc
    log.info("lab %s is up (%.1f s)", prefix, time.monotonic() - started)


def down(prefix: str, *, root: Path = STATE_ROOT, tools: Tools | None = None) -> None:
    """Remove every namespace, process and file of lab ``prefix``; quiet when there is none.

    Namespaces are found from ``lab.json`` and by exact lab pod names with
    this prefix; processes by recorded pid, after checking they are still the
    lab's own.
    """
    check_prefix(prefix)
    ip = tools.ip if tools else check_root_and_ip("lab down")
    state = read_state(prefix, root)
    _teardown(prefix, state.spec if state else None, state.processes if state else (), ip, root)


# --- checks -------------------------------------------------------------------------------------


def _structural_problems(state: LabState, root: Path) -> list[str]:
    """Missing namespaces and containers whose PID 1 is gone (cheap: no subprocess)."""
    spec = state.spec
    directory = state_dir(spec.prefix, root)
    problems = [f"namespace {ns} missing" for ns in spec.namespaces if not system.netns_exists(ns)]
    recorded = {(r.pod, r.container) for r in state.processes}
    wanted = {(p.name, c) for p in spec.pods for c in containers.CONTAINERS[p.role]}
    problems += [f"container {c} of {pod} never started" for pod, c in sorted(wanted - recorded)]
    problems += [
        f"container {r.container} of {r.pod} (pid {r.pid}) is gone"
        for r in state.processes
        if not containers.alive_and_ours(r.pid, directory, _key(directory, r))
    ]
    return problems


def _key(directory: Path, r: ProcessRecord) -> str:
    return containers.marker(directory, r.pod, r.container)


def _leftover_namespaces(spec: LabSpec) -> list[str]:
    names = {ns for ns in spec.namespaces if system.netns_exists(ns)}
    return sorted(names | set(system.lab_namespaces(spec.prefix)))


# --- teardown -----------------------------------------------------------------------------------


def _teardown(
    prefix: str,
    spec: LabSpec | None,
    processes: tuple[ProcessRecord, ...] | list[ProcessRecord],
    ip: str,
    root: Path,
) -> None:
    directory = state_dir(prefix, root)
    names = set(system.lab_namespaces(prefix))
    if spec is not None:
        names |= {ns for ns in spec.namespaces if system.netns_exists(ns)}
    pids = {
        r.pid for r in processes if containers.alive_and_ours(r.pid, directory, _key(directory, r))
    }
    # Containers started by a run that died before recording them.
    pids |= {
        pid for pid in system.pids_in_namespaces(names) if containers.alive_and_ours(pid, directory)
    }
    if pids:
        log.info("stopping %d lab containers", len(pids))
        survivors = system.kill(pids)
        if survivors:
            raise LabError(f"lab down: pids {survivors} did not exit even after SIGKILL")
    if names:
        log.info("deleting %d namespaces", len(names))
        system.run(
            [ip, "-force", "-batch", "-"],
            what="delete lab namespaces",
            stdin=system.batch(f"netns del {ns}" for ns in sorted(names)),
        )
    if directory.exists():
        shutil.rmtree(directory)
    for parent in (directory.parent, directory.parent.parent):
        try:
            parent.rmdir()  # only when no other lab uses it
        except OSError:
            break


# --- build --------------------------------------------------------------------------------------


def _build(spec: LabSpec, tools: Tools, root: Path, ready_timeout: float) -> None:
    directory = state_dir(spec.prefix, root)
    directory.mkdir(parents=True, exist_ok=True)
    # Recorded first: whatever happens next, down finds the namespaces.
    write_state(LabState(spec=spec), root)
    t0 = time.monotonic()

    system.run(
        [tools.ip, "-batch", "-"],
        what="create lab namespaces",
        stdin=system.batch(render.netns_add_lines(spec)),
    )
    plans = [render.namespace_plan(spec, pod) for pod in spec.pods]

    # Sysctls before links: new interfaces inherit the default.* values.
    def set_sysctls(plan: render.NamespacePlan) -> None:
        argv = [tools.ip, "netns", "exec", plan.netns, tools.sysctl, "-q", "-w", *plan.sysctls]
        system.run(argv, what=f"sysctls of {plan.netns}")

    system.parallel(set_sysctls, plans)
    system.run(
        [tools.ip, "-batch", "-"],
        what="create lab links",
        stdin=system.batch(render.veth_lines(spec)),
    )

    def configure(plan: render.NamespacePlan) -> None:
        for opts, lines, step in (
            ((), plan.setup, "links and addresses"),
            (("-4",), plan.routes4, "IPv4 rules and routes"),
            (("-6",), plan.routes6, "IPv6 rules and routes"),
        ):
            if lines:
                system.run(
                    [tools.ip, *opts, "-n", plan.netns, "-batch", "-"],
                    what=f"{step} of {plan.netns}",
                    stdin=system.batch(lines),
                )

    system.parallel(configure, plans)
    _load_nft(spec, tools, directory)
    log.debug("namespaces configured in %.2f s", time.monotonic() - t0)

    records = _start_containers(spec, tools, root)
    log.debug("containers started at %.2f s", time.monotonic() - t0)
    system.parallel(
        lambda r: _configure_nfqlb(spec, tools, r), [r for r in records if r.kind == "nfqlb"]
    )
    log.debug("nfqlb configured at %.2f s", time.monotonic() - t0)

    _wait_ready(spec, tools, root, ready_timeout)
    write_state(LabState(spec=spec, processes=tuple(records), complete=True), root)


def _container_specs(spec: LabSpec, tools: Tools, directory: Path) -> list[ContainerSpec]:
    """Every container of the lab (lab/containers.py has the layout)."""
    out: list[ContainerSpec] = []
    for pod in spec.pods:
        for name in containers.CONTAINERS[pod.role]:
            if name in ("gateway", "frontend"):
                out.append(_bird_container(spec, pod, name, tools, directory))
            elif name == "example-target":
                out.append(_target_container(spec, pod, name, directory))
            elif name == "stateless-lb" and spec.marking == "nfqlb":
                out.append(_nfqlb_container(pod, name, tools))
            else:
                out.append(containers.idle(directory, pod.name, name, pod.netns))
    return out


def _start_containers(spec: LabSpec, tools: Tools, root: Path) -> list[ProcessRecord]:
    """Start every container, record it, then wait until bird and the servers are listening."""
    directory = state_dir(spec.prefix, root)
    specs = _container_specs(spec, tools, directory)
    pids = containers.start(specs, directory)
    records = [
        ProcessRecord(kind=s.kind, pod=s.pod, netns=s.netns, pid=pid, container=s.name)
        for s, pid in zip(specs, pids, strict=True)
    ]
    write_state(LabState(spec=spec, processes=tuple(records)), root)

    def ready(record: ProcessRecord) -> None:
        what = f"{record.kind} in container {record.container} of {record.pod}"
        if record.kind == "bird":
            path = bird_paths(directory, record.pod)["ctl"]
        elif record.kind == "target":
            path = target_paths(directory, record.pod)["pid"]
        else:
            return
        try:
            system.wait_for_file(path, record.pid, 10.0, what)
        except LabError as exc:
            last = containers.last_log_line(directory, record.pod, record.container)
            raise LabError(f"{exc}{f': {last}' if last else ''}") from None

    system.parallel(ready, records)
    return records


def _load_nft(spec: LabSpec, tools: Tools, directory: Path) -> None:
    """Meridio's nftables in every LB; queue rules as xtables NFQUEUE where nft has no queue.

    ``nft -f`` is one transaction, so a refused ruleset leaves nothing behind and the second
    try starts clean.
    """
    lbs = [spec.netns(f.pod) for f in spec.frontends]
    ruleset = render.nft_ruleset(spec)
    (directory / "lb.nft").write_text(ruleset)

    def load(netns: str, text: str) -> None:
        argv = [tools.ip, "netns", "exec", netns, tools.nft, "-f", "-"]
        system.run(argv, what=f"nftables of {netns}", stdin=text)

    try:
        system.parallel(lambda ns: load(ns, ruleset), lbs)
        return
    except LabError as exc:
        if spec.marking != "nfqlb" or "queue" not in str(exc):
            raise
        log.debug("nft has no queue expression here (%s): using the xtables NFQUEUE target", exc)
    ruleset = render.nft_ruleset(spec, native_queue=False)
    (directory / "lb.nft").write_text(ruleset)

    def load_compat(netns: str) -> None:
        load(netns, ruleset)
        argv = [tools.ip, "netns", "exec", netns, sys.executable, "-m", system.NFT_QUEUE_MODULE]
        system.run(argv, what=f"NFQUEUE rules of {netns}")

    system.parallel(load_compat, lbs)


def _nfqlb_container(pod: Pod, name: str, tools: Tools) -> ContainerSpec:
    """The ``stateless-lb`` container: ``nfqlb flowlb`` as its PID 1, as Meridio runs it."""
    if not tools.nfqlb:
        raise LabError(f"lab up needs nfqlb: {NFQLB_HINT}")
    argv = (tools.nfqlb, *render.NFQLB_FLOWLB_ARGS)
    return ContainerSpec(pod.name, name, pod.netns, "nfqlb", tools.nfqlb, argv)


def _configure_nfqlb(spec: LabSpec, tools: Tools, flowlb: ProcessRecord) -> None:
    """The stream's shm, its targets and the trench's flow, run inside ``flowlb``'s container.

    As the stateless-lb does (reference §2.4): ``init``, one ``activate`` per target, then
    ``flow-set``, which talks to flowlb's socket and is retried until flowlb listens (5 s).
    One shell inside the container runs them all: a scaled lab activates dozens of targets
    per LB, and one ``nsenter`` each would cost more than the commands.
    """
    nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
    steps = []
    for cmd in render.nfqlb_commands(spec):
        line = shlex.join([tools.nfqlb, *cmd])
        if cmd[0] == "flow-set":
            line = f"n=0; until {line}; do n=$((n+1)); [ $n -lt 250 ] || exit 1; sleep 0.02; done"
        steps.append(line)
    script = "set -e\n" + "\n".join(steps) + "\n"
    argv = containers.exec_argv(nsenter, flowlb.pid, ["/bin/sh", "-c", script])
    # ``init`` computes and writes the M x N permutation table: 400 MB and ~1.5 s for
    # 1,000 targets, several times that while a big lab's other LBs do the same.
    timeout = 30.0 + 0.05 * len(spec.targets)
    system.run(
        argv, what=f"nfqlb setup in container {flowlb.container} of {flowlb.pod}", timeout=timeout
    )


def _bird_container(
    spec: LabSpec, pod: Pod, name: str, tools: Tools, directory: Path
) -> ContainerSpec:
    paths = bird_paths(directory, pod.name)
    if pod.role == "gateway":
        conf = render.bird_gw_conf(spec, str(paths["log"]))
    else:
        conf = render.bird_fe_conf(spec, pod.name, str(paths["log"]))
    paths["conf"].write_text(conf)
    paths["ctl"].unlink(missing_ok=True)
    # In the foreground: bird is the container's PID 1, as a container runtime runs it.
    argv = (tools.bird, "-f", "-c", str(paths["conf"]), "-s", str(paths["ctl"]))
    return ContainerSpec(pod.name, name, pod.netns, "bird", tools.bird, argv)


def _target_container(spec: LabSpec, pod: Pod, name: str, directory: Path) -> ContainerSpec:
    paths = target_paths(directory, pod.name)
    paths["pid"].unlink(missing_ok=True)
    ports = ",".join(str(p) for p in spec.ports)
    # The pid file is written once every socket listens: the readiness signal.
    argv = [sys.executable, "-I", "-S", str(system.TARGET_SCRIPT)]
    argv += ["--name", pod.name, "--netns", pod.netns, "--ports", ports]
    argv += ["--address", spec.vip4, "--address", spec.vip6, "--pidfile", str(paths["pid"])]
    return ContainerSpec(pod.name, name, pod.netns, "target", sys.executable, tuple(argv))


def _wait_ready(spec: LabSpec, tools: Tools, root: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        problems = dataplane_problems(spec, tools.ip, tools.birdc, root)
        if not problems:
            return
        if time.monotonic() > deadline:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise LabError(f"lab not ready after {timeout:g} s: {'; '.join(problems[:3])}{more}")
        time.sleep(0.2)
