"""The application in each lab target: answer every connection with the pod's name.

Why: Meridio's e2e tests learn which target got a connection from mconnect
talking to a server that names itself. The lab does the same so
``lab traffic`` (and a human with ``nc``) can see the load-balancing: it
listens on the VIPs (TCP and UDP, ports 4000-4003), writes its name to each
TCP connection and then closes it, and echoes its name to each datagram,
from the VIP it was sent to.

One process per target, run inside the target's namespace::

    ip netns exec mdl-target-a1 python -m meridio_debug.controller.lab.target_server \\
        --name target-a1 --netns mdl-target-a1 --address 20.0.0.1 --address 2000::1 \\
        --ports 4000-4003 [--daemon --pidfile F --log F]

With ``--daemon`` it binds every socket first, then detaches (double fork)
and exits 0 only once the server runs and its pid file is written, so the
caller knows it is ready and the server is never the caller's child (nothing
to reap). SIGTERM or SIGINT end it cleanly: sockets closed, pid file removed.
``--netns`` is only a label: it makes the process recognisable in ``ps`` and
lets ``lab down`` verify a recorded pid before signalling it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence

_TCP, _UDP = "tcp", "udp"


def parse_ports(text: str) -> list[int]:
    """``4000-4003`` or ``4000,4002`` -> list of ports."""
    ports: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if not 0 < first <= last < 65536:
            raise ValueError(f"bad port range {part!r}")
        ports.extend(range(first, last + 1))
    return ports


def bind_all(addresses: Sequence[str], ports: Sequence[int]) -> list[tuple[str, socket.socket]]:
    """A listening TCP and a bound UDP socket per address and port (non-blocking)."""
    socks: list[tuple[str, socket.socket]] = []
    try:
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            for port in ports:
                tcp = socket.socket(family, socket.SOCK_STREAM)
                socks.append((_TCP, tcp))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((address, port))
                tcp.listen(128)
                udp = socket.socket(family, socket.SOCK_DGRAM)
                socks.append((_UDP, udp))
                udp.bind((address, port))
        for _, s in socks:
            s.setblocking(False)
    except OSError:
        for _, s in socks:
            s.close()
        raise
    return socks


def serve(name: str, socks: Sequence[tuple[str, socket.socket]]) -> int:
    """Answer until SIGTERM/SIGINT; returns the number of answers given."""
    answer = f"{name}\n".encode()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    old_fd = signal.set_wakeup_fd(wake_w.fileno())
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    answered = 0
    with selectors.DefaultSelector() as sel:
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        for kind, s in socks:
            sel.register(s, selectors.EVENT_READ, kind)
        try:
            running = True
            while running:
                for key, _ in sel.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if key.data == "wake":
                        running = False
                    elif key.data == _TCP:
                        with contextlib.suppress(BlockingIOError, ConnectionError):
                            conn, _addr = sock.accept()
                            with conn:
                                conn.setblocking(False)
                                with contextlib.suppress(OSError):
                                    conn.send(answer)
                                answered += 1
                    else:
                        with contextlib.suppress(BlockingIOError, ConnectionError):
                            _data, peer = sock.recvfrom(2048)
                            with contextlib.suppress(OSError):
                                sock.sendto(answer, peer)
                            answered += 1
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
    return answered


def _daemonize(pidfile: str, log: str | None) -> None:
    """Double fork; the original process exits 0 when the grandchild has written ``pidfile``."""
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:  # original process: wait for the grandchild's word
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as r:
            word = r.read()
        os._exit(0 if word == b"ok" else 1)
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:  # intermediate: leave so the grandchild is nobody's child here
        os._exit(0)
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")
    devnull = os.open(os.devnull, os.O_RDWR)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log else devnull
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.write(ready_w, b"ok")
    os.close(ready_w)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lab target: answer connections with a name")
    parser.add_argument("--name", required=True, help="the answer (the target pod's name)")
    parser.add_argument("--netns", default="", help="label: the namespace this runs in")
    parser.add_argument("--address", action="append", required=True, help="address to serve")
    parser.add_argument("--ports", default="4000-4003", help="ports, e.g. 4000-4003")
    parser.add_argument("--daemon", action="store_true", help="detach once listening")
    parser.add_argument("--pidfile", help="write the server's pid here (needed with --daemon)")
    parser.add_argument("--log", help="append stdout/stderr here when detached")
    args = parser.parse_args(argv)
    if args.daemon and not args.pidfile:
        parser.error("--daemon needs --pidfile")
    try:
        socks = bind_all(args.address, parse_ports(args.ports))
    except (OSError, ValueError) as exc:
        print(f"target_server {args.name}: cannot listen: {exc}", file=sys.stderr)
        return 1
    if args.daemon:
        _daemonize(args.pidfile, args.log)
    elif args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} {args.name}: serving {len(socks)} sockets", flush=True)
    try:
        answered = serve(args.name, socks)
    finally:
        for _, s in socks:
            s.close()
        if args.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(args.pidfile)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} {args.name}: stopped after {answered} answers", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
