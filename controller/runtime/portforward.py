"""A port-forward stream through the API server, on asyncio: one websocket per connection.

Why not ``kubernetes.stream.portforward``: it runs a thread per connection
that relays through a socketpair with ``select.select``, which raises
``ValueError: filedescriptor out of range`` as soon as the process holds more
than 1,024 file descriptors -- a 48-pod trench got there, and the threads died
without closing their sockets, which made it worse. Its websocket-client
opens a new ``SSLContext`` (and reads the CA file) per connection, and has no
handshake timeout. Here every stream is a coroutine on the caller's event
loop, with one ``SSLContext`` per command, a bounded handshake, and the
API server's refusal as a status code and body.

The protocol is the kubelet's ``v4.channel.k8s.io`` over RFC 6455, the one
``kubectl port-forward`` falls back to without SPDY: the upgrade is a GET of
``pods/{name}/portforward?ports=P``; every binary message starts with a
channel byte, 0 for the data of the (single) port and 1 for its error text,
and the first message on each channel carries only the port number (2 bytes,
little endian). Client frames are masked, server frames are not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
import struct
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

PROTOCOL = "v4.channel.k8s.io"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEADER = 64 * 1024
_MAX_BODY = 64 * 1024
_MAX_MESSAGE = 64 * 1024 * 1024
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class UpgradeRefused(Exception):
    """The API server answered the upgrade with ``status`` (403, 404, 429, ...) instead of 101."""

    def __init__(self, status: int, reason: str, body: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status} {reason}: {body[:200]}")
        self.status = status
        self.reason = reason
        self.body = body
        self.retry_after = retry_after


class ProtocolError(Exception):
    """The server broke the websocket or port-forward protocol."""


def _mask(key: bytes, data: bytes) -> bytes:
    n = len(data)
    pad = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(pad, "little")).to_bytes(n, "little")


def frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (FIN set)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + _mask(key, payload)


@dataclass
class Partial:
    """A fragmented message still being read: kept across the control frames between fragments."""

    opcode: int = -1
    parts: list[bytes] = field(default_factory=list)
    size: int = 0


async def read_message(
    reader: asyncio.StreamReader, partial: Partial | None = None
) -> tuple[int, bytes]:
    """The next whole message (fragments joined) or control frame, as (opcode, payload).

    A control frame (close, ping, pong) may come between the fragments of a data
    message (RFC 6455 5.4); it is returned at once, and the fragments read so far
    stay in ``partial`` for the next call, so a caller reading on after a ping
    loses nothing (pass the same ``partial`` every time).
    """
    p = partial if partial is not None else Partial()
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
        key = await reader.readexactly(4) if b1 & 0x80 else b""
        op = b0 & 0x0F
        if n > _MAX_MESSAGE or (op < OP_CLOSE and p.size + n > _MAX_MESSAGE):
            raise ProtocolError(f"websocket message larger than {_MAX_MESSAGE} bytes")
        data = await reader.readexactly(n)
        if key:
            data = _mask(key, data)
        if op >= OP_CLOSE:
            return op, data
        if op != OP_CONT:
            p.opcode = op
        p.parts.append(data)
        p.size += n
        if b0 & 0x80:
            message = p.opcode, b"".join(p.parts)
            p.opcode, p.parts, p.size = -1, [], 0
            return message


class PortForward:
    """One port-forward stream: ``read``/``write`` the pod port's bytes, ``error`` its error text."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._seen_port = [False, False]  # each channel's first message is the port number
        self._partial = Partial()  # a fragmented message across pings
        self.error = ""

    @classmethod
    async def open(
        cls,
        url: str,
        headers: Mapping[str, str],
        context: ssl.SSLContext | None,
        server_hostname: str | None = None,
        proxy: str | None = None,
        proxy_headers: Mapping[str, str] | None = None,
        proxy_context: ssl.SSLContext | None = None,
    ) -> PortForward:
        """Connect and upgrade; UpgradeRefused for any answer but 101 (the caller bounds time).

        ``proxy``: an http:// or https:// proxy reached with CONNECT, ``proxy_headers``
        (e.g. Proxy-Authorization) sent with it, as the kubernetes client's settings say.
        """
        u = urllib.parse.urlsplit(url)
        tls = u.scheme in ("https", "wss")
        host = u.hostname or ""
        port = u.port or (443 if tls else 80)
        if proxy:
            p = urllib.parse.urlsplit(proxy)
            if p.scheme not in ("http", "https"):
                raise ProtocolError(
                    f"proxy {proxy}: only http:// and https:// proxies are supported"
                )
            secure = p.scheme == "https"
            reader, writer = await asyncio.open_connection(
                p.hostname,
                p.port or (443 if secure else 80),
                ssl=(proxy_context or ssl.create_default_context()) if secure else None,
                limit=1 << 20,
            )
            hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            extra = "".join(f"{k}: {v}\r\n" for k, v in (proxy_headers or {}).items())
            writer.write(f"CONNECT {hostport} HTTP/1.1\r\nHost: {hostport}\r\n{extra}\r\n".encode())
            status, reason, _h = await _response_head(reader)
            if status != 200:
                writer.close()
                raise UpgradeRefused(status, reason, f"proxy {p.hostname} refused CONNECT", None)
            if tls:
                await writer.start_tls(
                    context or ssl.create_default_context(), server_hostname=server_hostname or host
                )
        else:
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=(context or ssl.create_default_context()) if tls else None,
                server_hostname=(server_hostname or host) if tls else None,
                limit=1 << 20,
            )
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            target = u.path + (f"?{u.query}" if u.query else "")
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {u.netloc}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
                f"Sec-WebSocket-Protocol: {PROTOCOL}",
                *(f"{k}: {v}" for k, v in headers.items()),
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            status, reason, head = await _response_head(reader)
            if status != 101:
                body = await _body(reader, head)
                retry = head.get("retry-after")
                raise UpgradeRefused(
                    status, reason, body, float(retry) if retry and retry.isdigit() else None
                )
            digest = hashlib.sha1(key.encode() + _GUID, usedforsecurity=False).digest()  # RFC 6455
            accept = base64.b64encode(digest).decode()
            if head.get("sec-websocket-accept") != accept:
                raise ProtocolError("the server's Sec-WebSocket-Accept does not match our key")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    async def read(self) -> bytes:
        """The pod port's next bytes; b"" when the stream ended."""
        while True:
            try:
                op, data = await read_message(self._reader, self._partial)
            except (asyncio.IncompleteReadError, ConnectionError):
                return b""
            if op == OP_CLOSE:
                return b""
            if op == OP_PING:
                self._writer.write(frame(OP_PONG, data))
                continue
            if op != OP_BINARY or not data:
                continue
            channel, payload = data[0], data[1:]
            if channel > 1:
                raise ProtocolError(f"port-forward: unexpected channel {channel}")
            if not self._seen_port[channel]:
                self._seen_port[channel] = True
                payload = payload[2:]
            if channel == 1:
                self.error += payload.decode(errors="replace")
            elif payload:
                return payload

    async def write(self, data: bytes) -> None:
        self._writer.write(frame(OP_BINARY, b"\x00" + data))
        await self._writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self._writer.is_closing():
                self._writer.write(frame(OP_CLOSE, struct.pack("!H", 1000)))
        self._writer.close()


async def _response_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise ProtocolError("response head too long") from exc
    except asyncio.IncompleteReadError as exc:
        raise ConnectionError("the server closed the connection before answering") from exc
    if len(raw) > _MAX_HEADER:
        raise ProtocolError("response head too long")
    first, *rest = raw.decode("iso-8859-1").split("\r\n")
    parts = first.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP response: {first[:80]!r}")
    head = {}
    for line in rest:
        name, sep, value = line.partition(":")
        if sep:
            head[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", head


async def _body(reader: asyncio.StreamReader, head: Mapping[str, str]) -> str:
    """A refusal's body (the API server's Status JSON), bounded."""
    try:
        if head.get("content-length", "").isdigit():
            data = await reader.readexactly(min(int(head["content-length"]), _MAX_BODY))
        elif head.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while len(data) < _MAX_BODY:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data += await reader.readexactly(size)
                await reader.readline()
        else:
            data = await reader.read(_MAX_BODY)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        return ""
    return data.decode(errors="replace")
