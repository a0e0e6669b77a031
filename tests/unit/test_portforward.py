"""The port-forward client's websocket and channel handling, against a small asyncio server.

The real API server and kubelet are the cluster tier's (tests/cluster); this checks
what they rarely show: refusals with a body, Retry-After, fragmented and large
messages, pings, the port header of each channel, masking of what we send.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
from collections.abc import Awaitable, Callable

import pytest

from meridio_debug.controller.runtime.portforward import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    PortForward,
    ProtocolError,
    UpgradeRefused,
    frame,
    read_message,
)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, str]], Awaitable[None]]


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


async def read_head(reader: asyncio.StreamReader) -> dict[str, str]:
    """An HTTP request's head: its request line, then its headers by lower-case name."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    head = {"request": lines[0]}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            head[k.strip().lower()] = v.strip()
    return head


async def serve(handler: Handler) -> tuple[asyncio.AbstractServer, str]:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        try:
            await handler(reader, writer, head)
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/api/v1/namespaces/ns/pods/p/portforward?ports=7"


def accept(writer: asyncio.StreamWriter, head: dict[str, str]) -> None:
    digest = hashlib.sha1(head["sec-websocket-key"].encode() + GUID).digest()
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n"
        b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n\r\n"
    )
    port = (7).to_bytes(2, "little")
    writer.write(server_frame(OP_BINARY, b"\x00" + port) + server_frame(OP_BINARY, b"\x01" + port))


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


def test_echo_with_fragments_pings_and_a_large_message() -> None:
    big = bytes(range(256)) * 600  # 153,600 bytes: the 64-bit length form

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: dict[str, str]):
        assert head["request"].startswith("GET /api/v1/namespaces/ns/pods/p/portforward?ports=7 ")
        assert head["sec-websocket-protocol"] == "v4.channel.k8s.io"
        assert head["authorization"] == "Bearer t"
        accept(w, head)
        op, data = await read_message(r)  # what the client sent: masked, unmasked by the reader
        assert (op, data) == (OP_BINARY, b"\x00hello")
        w.write(server_frame(OP_PING, b"p"))
        # a ping between the fragments of one message (RFC 6455 5.4): nothing may be lost
        w.write(server_frame(OP_BINARY, b"\x00wo", fin=False) + server_frame(OP_PING, b"q"))
        w.write(server_frame(OP_CONT, b"r", fin=False) + server_frame(OP_CONT, b"ld"))
        for expected in (b"p", b"q"):
            op, data = await read_message(r)
            assert (op, data) == (OP_PONG, expected)
        w.write(server_frame(OP_BINARY, b"\x00" + big))
        w.write(server_frame(OP_BINARY, b"\x01oops"))
        w.write(server_frame(OP_CLOSE, b""))
        await w.drain()

    async def main() -> None:
        server, url = await serve(handler)
        async with server:
            pf = await PortForward.open(url, {"Authorization": "Bearer t"}, None)
            await pf.write(b"hello")
            assert await pf.read() == b"world"
            assert await pf.read() == big
            assert await pf.read() == b""  # the error channel is kept, the close ends the stream
            assert pf.error == "oops"
            pf.close()

    run(main())


def refusal(answer: bytes) -> Exception:
    """What PortForward.open raises when the server answers the upgrade with ``answer``."""
    raised: list[Exception] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: dict[str, str]):
        w.write(answer)
        await w.drain()

    async def main() -> None:
        server, url = await serve(handler)
        async with server:
            try:
                await PortForward.open(url, {}, None)
            except (UpgradeRefused, ProtocolError) as exc:
                raised.append(exc)

    run(main())
    assert raised, "the upgrade was not refused"
    return raised[0]


def test_refusal_is_the_status_and_the_servers_body() -> None:
    body = json.dumps({"kind": "Status", "message": 'pods "p" is forbidden', "code": 403})
    err = refusal(
        f"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    assert isinstance(err, UpgradeRefused)
    assert err.status == 403
    assert json.loads(err.body)["message"] == 'pods "p" is forbidden'


def test_429_says_when_to_retry() -> None:
    err = refusal(
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\nno"
    )
    assert isinstance(err, UpgradeRefused)
    assert (err.status, err.retry_after, err.body) == (429, 1.0, "no")


def test_a_wrong_accept_key_is_refused() -> None:
    err = refusal(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: bad\r\n\r\n")
    assert isinstance(err, ProtocolError)
    assert "Sec-WebSocket-Accept" in str(err)


def test_client_frames_are_masked() -> None:
    payload = b"\x00" + b"x" * 300
    raw = frame(OP_BINARY, payload)
    assert raw[0] == 0x80 | OP_BINARY and raw[1] == 0x80 | 126  # mask bit, 16-bit length
    assert raw[8:] != payload  # masked on the wire

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        assert await read_message(reader) == (OP_BINARY, payload)

    run(main())


def test_through_a_proxy_with_its_headers() -> None:
    """CONNECT to the API server through an http proxy, Proxy-Authorization sent with it."""
    seen: dict[str, str] = {}

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, head: dict[str, str]):
        seen.update(head)
        w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        accept(w, await read_head(r))  # the upgrade, through the tunnel
        w.write(server_frame(OP_BINARY, b"\x00hi") + server_frame(OP_CLOSE, b""))
        await w.drain()

    async def main() -> None:
        server, proxy_url = await serve(handler)
        proxy = proxy_url.split("/api/")[0]
        async with server:
            pf = await PortForward.open(
                "http://api.example:6443/api/v1/namespaces/ns/pods/p/portforward?ports=7",
                {},
                None,
                proxy=proxy,
                proxy_headers={"Proxy-Authorization": "Basic dTpw"},
            )
            assert await pf.read() == b"hi"
            pf.close()

    run(main())
    assert seen["request"] == "CONNECT api.example:6443 HTTP/1.1"
    assert seen["proxy-authorization"] == "Basic dTpw"


def test_a_proxy_scheme_that_cannot_carry_it_is_one_clear_error() -> None:
    async def main() -> None:
        with pytest.raises(ProtocolError, match="only http:// and https:// proxies"):
            await PortForward.open("http://h/x", {}, None, proxy="socks5://127.0.0.1:1080")

    run(main())
