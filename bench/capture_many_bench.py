"""Capture in all 48 pods of the scaled lab at once: lossless, and its CPU against tcpdump's.

Why: issue 16 asks that a capture in every pod of a 4-LB/4-proxy/40-target trench
(48 Meridio pods, the lab bench/analyze_bench.py builds) stays lossless at 50k pps
in aggregate and says what it costs. The baseline is what an operator would do
by hand: one ``tcpdump -i any -w`` per pod (48 processes, the same 32 MiB ring,
the same filter), on the same traffic, in the same run.

Set-up (root): ``lab up`` scaled 4 x 4 x 10 (prefix unique to the run, removed at
the end); bench/udpsend.c (compiled with gcc into a temporary directory) in the
gateway sends 64-byte UDP frames to the VIP 20.0.0.1:4000 over 256 flows from the
64 client addresses, so the LBs' nfqlb spreads them over the 40 targets. With
``-i any`` every packet is captured 5 times (LB in and out, proxy bridge ports in
and out, target in): RATE pps sent is about 5 x RATE pps captured in total.

Per rate it prints, for the 48 tcpdumps and for one ``meridio-debug capture --lab``
of the 48 pods: packets captured (per role), drops (tcpdump's "dropped by kernel";
our kernel + agent drops), CPU while sending and settling (every thread's
schedstat, controller + launcher + 48 agents for ours) per captured packet, the
ratio ours/tcpdump, and the load average before each run.

    .venv/bin/python bench/capture_many_bench.py [--seconds 5] [--rates 10000,50000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capture_bench import CLI, count_packets, tree_cpu, wait_stderr

from meridio_debug.controller.lab import build_spec, down, up

HERE = Path(__file__).resolve().parent
FILTER = "udp dst port 4000"
VIP = "20.0.0.1"
FLOWS = 256
SETTLE_S = 1.5  # tcpdump hands a partly filled block over after 1 s


def build_sender(workdir: str) -> str:
    exe = os.path.join(workdir, "udpsend")
    subprocess.run(["gcc", "-O2", "-o", exe, str(HERE / "udpsend.c")], check=True)
    return exe


def send(exe: str, gw_netns: str, rate: int, count: int) -> dict[str, float]:
    res = subprocess.run(
        ["ip", "netns", "exec", gw_netns, exe, VIP, "4000", str(rate), str(count), str(FLOWS),
         "200.100.0"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(res.stdout)
    return result


def run_tcpdumps(
    exe: str, spec: object, pods: list[tuple[str, str, str]], rate: int, count: int, workdir: str
) -> tuple[dict[str, int], int, float, dict[str, float]]:
    """48 tcpdumps, one per pod: (captured per role, kernel drops, CPU s, sender result)."""
    procs = []
    try:
        for name, _role, netns in pods:
            out = os.path.join(workdir, f"td-{name}.pcap")
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, "tcpdump", "-i", "any", "-B", "32768", "-s",
                 "262144", "-w", out, FILTER],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            procs.append(proc)
        for proc in procs:
            wait_stderr(proc, b"listening on", 60)
        cpu0 = sum(tree_cpu(p.pid) for p in procs)
        sent = send(exe, spec.netns("gw"), rate, count)  # type: ignore[attr-defined]
        time.sleep(SETTLE_S)
        cpu = sum(tree_cpu(p.pid) for p in procs) - cpu0
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
    per_role: dict[str, int] = {}
    drops = 0
    for (_name, role, _netns), proc in zip(pods, procs, strict=True):
        proc.wait(60)
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), True)
        text = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        got = re.search(r"(\d+) packets captured", text)
        dropped = re.search(r"(\d+) packets dropped by kernel", text)
        per_role[role] = per_role.get(role, 0) + (int(got.group(1)) if got else 0)
        drops += int(dropped.group(1)) if dropped else 0
    return per_role, drops, cpu, sent


_SUMMARY = re.compile(
    r"(\S+): (\d+) packets captured; dropped: (\d+) by the kernel \(ring full\), "
    r"(\d+) by the agent",
    re.M,
)


def run_ours(
    exe: str, spec: object, prefix: str, roles: dict[str, str], rate: int, count: int, out: str
) -> tuple[dict[str, int], int, int, float, dict[str, float], int]:
    """One capture of all pods: (per role, kernel drops, agent drops, CPU s, sent, in file)."""
    proc = subprocess.Popen(
        [*CLI, "capture", "--lab", "--prefix", prefix, "-i", "any", "-f", FILTER, "-w", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    seen = wait_stderr(proc, b"capturing in", 180)
    split0 = split_cpu(proc.pid)
    sent = send(exe, spec.netns("gw"), rate, count)  # type: ignore[attr-defined]
    time.sleep(SETTLE_S)
    split = {k: v - split0[k] for k, v in split_cpu(proc.pid).items()}
    cpu = sum(split.values())
    sent["split"] = split  # type: ignore[assignment]
    proc.send_signal(signal.SIGINT)
    proc.wait(120)
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), True)
    text = (seen + proc.stderr.read()).decode(errors="replace")
    proc.stderr.close()
    per_role: dict[str, int] = {}
    kdrops = adrops = 0
    pods = 0
    for m in _SUMMARY.finditer(text):
        role = roles.get(m.group(1), "?")
        per_role[role] = per_role.get(role, 0) + int(m.group(2))
        kdrops += int(m.group(3))
        adrops += int(m.group(4))
        pods += 1
    if pods != len(roles):
        raise SystemExit(f"only {pods} of {len(roles)} pods reported:\n{text[-2000:]}")
    return per_role, kdrops, adrops, cpu, sent, count_packets(out)


def split_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the controller, the launcher and the agents (its children), apart."""
    out = {"controller": 0.0, "launcher": 0.0, "agents": 0.0}
    todo = [(pid, 0)]
    while todo:
        p, depth = todo.pop()
        kind = ("controller", "launcher")[depth] if depth < 2 else "agents"
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                out[kind] += (
                    int(Path(f"/proc/{p}/task/{task}/schedstat").read_text().split()[0]) / 1e9
                )
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo += [(int(c), depth + 1) for c in kids]
        except (OSError, IndexError, ValueError):
            continue
    return out


def fmt_roles(per_role: dict[str, int]) -> str:
    return " ".join(f"{r} {per_role.get(r, 0)}" for r in ("lb-fe", "proxy", "target"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rates", default="10000,50000", help="pps sent (x ~5 captured in total)")
    ap.add_argument("--lbs", type=int, default=4)
    ap.add_argument("--proxies", type=int, default=4)
    ap.add_argument("--targets-per-proxy", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("gcc") or not shutil.which("tcpdump"):
        print("needs root, gcc and tcpdump", file=sys.stderr)
        return 2
    prefix = f"mdc{os.getpid() % 10000}-"[:8]
    spec = build_spec(prefix, args.lbs, args.proxies, args.targets_per_proxy)
    workdir = tempfile.mkdtemp(prefix="capture-many-")
    started = time.perf_counter()
    try:
        up(spec)
        pods = [(p.name, p.role, p.netns) for p in spec.pods if p.role != "gateway"]
        roles = {name: role for name, role, _ in pods}
        print(
            f"lab {prefix}: {args.lbs} LBs, {args.proxies} proxies, {len(spec.targets)} targets, "
            f"{len(pods)} Meridio pods; up in {time.perf_counter() - started:.1f} s; "
            f"{os.cpu_count()} cores"
        )
        exe = build_sender(workdir)
        send(exe, spec.netns("gw"), 1000, 1000)  # warm: neighbours, nfqlb flows
        time.sleep(0.5)
        print(
            f"filter {FILTER!r}, -i any in every pod, {args.seconds:.0f} s per rate, "
            f"{FLOWS} flows of 64-byte frames to {VIP}"
        )
        for rate in (int(r) for r in args.rates.split(",")):
            count = int(rate * args.seconds)
            load = os.getloadavg()[0]
            td_roles, td_drops, td_cpu, td_sent = run_tcpdumps(
                exe, spec, pods, rate, count, workdir
            )
            for f in Path(workdir).glob("td-*.pcap"):
                f.unlink()
            td_total = sum(td_roles.values())
            load2 = os.getloadavg()[0]
            out = os.path.join(workdir, "ours.pcapng")
            our_roles, kd, ad, our_cpu, our_sent, in_file = run_ours(
                exe, spec, prefix, roles, rate, count, out
            )
            os.unlink(out)
            our_total = sum(our_roles.values())
            td_us = td_cpu / td_total * 1e6 if td_total else float("nan")
            our_us = our_cpu / our_total * 1e6 if our_total else float("nan")
            print(f"\nsent {rate} pps x {args.seconds:.0f} s to the VIP:")
            print(
                f"  48 x tcpdump   (load {load:4.1f}): sent {int(td_sent['sent'])} at "
                f"{td_sent['pps']:.0f} pps, captured {td_total} ({td_total / td_sent['secs']:.0f} pps "
                f"aggregate; {fmt_roles(td_roles)}), kernel drops {td_drops}, CPU "
                f"{td_cpu:.2f} s = {td_us:.2f} us/packet"
            )
            print(
                f"  meridio-debug  (load {load2:4.1f}): sent {int(our_sent['sent'])} at "
                f"{our_sent['pps']:.0f} pps, captured {our_total} ({our_total / our_sent['secs']:.0f} pps "
                f"aggregate; {fmt_roles(our_roles)}), in the file {in_file}, drops: kernel {kd}, "
                f"agent {ad}; CPU {our_cpu:.2f} s = {our_us:.2f} us/packet"
            )
            split: dict[str, float] = our_sent["split"]  # type: ignore[assignment]
            window = our_sent["secs"] + SETTLE_S
            print(
                "  our CPU per second of the run: "
                + ", ".join(f"{k} {v / window * 1000:.0f} ms" for k, v in split.items())
                + f" (agents: {split['agents'] / window / len(pods) * 1000:.1f} ms each); "
                f"48 x tcpdump {td_cpu / (td_sent['secs'] + SETTLE_S) * 1000:.0f} ms"
            )
            lossless = kd == 0 and ad == 0 and in_file == our_total
            print(
                f"  lossless: {'yes' if lossless else 'NO'}; "
                f"CPU per packet ours/tcpdump: {our_us / td_us:.1f}x"
            )
    finally:
        down(prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
