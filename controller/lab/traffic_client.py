"""The lab's traffic generator, run inside the gateway namespace (like mconnect).

Why a separate program: connections must leave from the gateway's client
sources (200.100.0.x, 200:100::x), which exist only in the gw namespace, and
the controller process stays in its own namespace. So ``lab.traffic`` starts
this module with ``ip netns exec <gw>``, gives it the probes as JSON on
stdin, and reads one JSON document from stdout::

    stdin:  {"timeout": 2.0, "concurrency": 128,
             "probes": [{"src": "200.100.0.1", "dst": "20.0.0.1", "port": 4000, "proto": "tcp"}]}
    stdout: {"results": [{"answer": "target-a1", "error": null, "sport": 41234, "ms": 1.3}]}

Results are in probe order. Each probe binds its socket first, so its source port (which
nfqlb hashes with the rest of the 5-tuple) is known even when nobody answers. A TCP probe
connects from ``src`` and reads what
the target writes before it closes; a UDP probe sends one datagram and waits
for the answer, sending once more after half the timeout (the first datagram
can be lost while a neighbour entry resolves).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from typing import Any


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self, answer: asyncio.Future[bytes]) -> None:
        self.answer = answer

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


def _first_line(data: bytes) -> str | None:
    text = data.decode(errors="replace").strip()
    return text.splitlines()[0] if text else None


def _bound(src: str, kind: socket.SocketKind) -> socket.socket:
    """A non-blocking socket bound to ``src`` and a kernel-chosen port (known before sending)."""
    sock = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET, kind)
    try:
        sock.setblocking(False)
        sock.bind((src, 0))
    except OSError:
        sock.close()
        raise
    return sock


async def _tcp(sock: socket.socket, dst: str, port: int, timeout: float) -> str | None:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (dst, port)), timeout)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return _first_line(data)


async def _udp(sock: socket.socket, dst: str, port: int, timeout: float) -> str | None:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()
    try:
        sock.connect((dst, port))
    except OSError:
        sock.close()
        raise
    transport, _ = await loop.create_datagram_endpoint(lambda: _Datagram(answer), sock=sock)
    try:
        transport.sendto(b"who?\n")
        try:
            data = await asyncio.wait_for(asyncio.shield(answer), timeout / 2)
        except TimeoutError:
            transport.sendto(b"who?\n")
            data = await asyncio.wait_for(answer, timeout / 2)
    finally:
        transport.close()
    return _first_line(data)


async def _probe(probe: dict[str, Any], timeout: float, gate: asyncio.Semaphore) -> dict[str, Any]:
    async with gate:
        start = time.monotonic()
        answer: str | None = None
        error: str | None = None
        sport: int | None = None
        try:
            tcp = probe["proto"] == "tcp"
            sock = _bound(probe["src"], socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
            sport = int(sock.getsockname()[1])
            answer = await (_tcp if tcp else _udp)(sock, probe["dst"], int(probe["port"]), timeout)
            if answer is None:
                error = "no answer (connection closed empty)"
        except TimeoutError:
            error = "timeout"
        except ConnectionRefusedError:
            error = "refused"
        except OSError as exc:
            error = exc.strerror or type(exc).__name__
        return {
            "answer": answer,
            "error": error,
            "sport": sport,
            "ms": round((time.monotonic() - start) * 1000, 2),
        }


async def run(request: dict[str, Any]) -> dict[str, Any]:
    """Run every probe of ``request``; results in probe order."""
    timeout = float(request.get("timeout", 2.0))
    gate = asyncio.Semaphore(int(request.get("concurrency", 128)))
    results = await asyncio.gather(*(_probe(p, timeout, gate) for p in request["probes"]))
    return {"results": list(results)}


def main() -> int:
    try:
        request = json.load(sys.stdin)
    except json.JSONDecodeError as exc:
        print(f"traffic_client: bad request on stdin: {exc}", file=sys.stderr)
        return 2
    json.dump(asyncio.run(run(request)), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
