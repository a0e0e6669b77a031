"""``meridio-debug-agent``: start the agent's gRPC server.

Listening is deliberately narrow, and every client is authenticated: the
agent can capture and send packets, so no other process may use it. A unix
socket must be in a private directory (0700, ours) and is created with umask
077, so it is never connectable by others, not even for an instant. TCP, on
loopback (reached through the API server's port-forward) as on any other
address, always needs mutual TLS (``--tls-client-ca``/``--tls-client-ca-env``;
agent/tls.py says why the agent makes its own key): every container of a pod
shares its loopback, and an application container must not get packet
capture and injection by talking to our agent.

The agent exits on its own after ``--idle-timeout`` seconds without a call, so
an injected ephemeral container (which can never be removed) does not linger
as a running process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from meridio_debug.agent import version
from meridio_debug.agent.errors import ListenError
from meridio_debug.agent.guard import RequestGuard

log = logging.getLogger("meridio_debug.agent")

MAX_REQUEST_BYTES = 1 << 20  # our largest request (4096 route queries) is far smaller
MAX_CONCURRENT_RPCS = 64
# Capture batches are 0.1-4 MiB: HTTP/2 frames and socket reads to match, not 16 KiB / 8 KiB
# pieces (gRPC's threads hand each piece on; under perf they are a quarter of a capture's
# CPU). Measured: 0.27 us of CPU per extra packet at ~250k pps with these, 0.28-0.33
# without (noisy, loaded machine). The controller sets the same (wire/client.py).
TRANSPORT_OPTIONS = [
    ("grpc.http2.max_frame_size", 1 << 20),
    ("grpc.experimental.tcp_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 16),
    ("grpc.experimental.tcp_max_read_chunk_size", 4 << 20),
]
TRIM_AFTER_S = 2.0  # idle this long after activity: give freed memory back


@dataclass(frozen=True)
class ListenAddress:
    """Where the agent listens: ``unix:PATH`` or ``tcp:HOST:PORT``."""

    scheme: str
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def grpc_target(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT``; raise ListenError saying the expected form."""
    expected = "expected unix:/path/to/agent.sock or tcp:127.0.0.1:PORT"
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ListenError(
                f"--listen {text!r}: the unix socket path must be absolute; {expected}"
            )
        return ListenAddress("unix", path=path)
    if text.startswith("tcp:"):
        host, sep, port_text = text[len("tcp:") :].rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ListenError(f"--listen {text!r}: {expected}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ListenError(
                f"--listen {text!r}: host must be an IP address; {expected}"
            ) from None
        return ListenAddress("tcp", host=host, port=int(port_text))
    raise ListenError(f"--listen {text!r}: {expected}")


def check_unix_path(path: str) -> None:
    """Refuse a socket path that is in use or is not a socket; remove a stale socket file.

    A stale socket (left by a killed agent) refuses connections; replacing it is
    safe. A live one belongs to another agent, and anything else is not ours.
    """
    parent = os.path.dirname(path) or "/"
    try:
        pst = os.stat(parent)
    except OSError:
        raise ListenError(f"cannot listen on {path}: directory {parent} does not exist") from None
    if pst.st_uid != os.geteuid() or pst.st_mode & 0o077:
        raise ListenError(
            f"cannot listen on {path}: directory {parent} is not private (mode "
            f"{stat.S_IMODE(pst.st_mode):o}, uid {pst.st_uid}); other users could connect; "
            "use a 0700 directory of this user"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(
            f"cannot listen on {path}: it exists and is not a socket; choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody is listening
        return
    finally:
        probe.close()
    raise ListenError(
        f"cannot listen on {path}: another process is serving there; choose another path"
    )


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS material: the agent's own certificate and key, and the CA its clients need."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes


def tls_config(
    client_ca: str | None, client_ca_env: str | None, cert: str | None, key: str | None
) -> TlsConfig | None:
    """Mutual TLS from the --tls-* flags; None without a client CA. ListenError saying what is wrong."""
    if client_ca and client_ca_env:
        raise ListenError("give the client CA once: --tls-client-ca or --tls-client-ca-env")
    if bool(cert) != bool(key):
        raise ListenError("--tls-cert and --tls-key go together")
    if client_ca_env:
        text = os.environ.get(client_ca_env, "")
        if not text.strip():
            raise ListenError(
                f"--tls-client-ca-env {client_ca_env}: the variable is unset or empty"
            )
        ca_pem, where = text.encode(), f"${client_ca_env}"
    elif client_ca:
        try:
            with open(client_ca, "rb") as f:
                ca_pem = f.read()
        except OSError as exc:
            raise ListenError(f"--tls-client-ca {client_ca}: {exc.strerror}") from exc
        where = client_ca
    else:
        if cert:
            raise ListenError("--tls-cert without a client CA: mutual TLS needs --tls-client-ca")
        return None
    # Only here: cryptography is ~9 MiB of RSS and a share of the start, and a
    # unix-socket agent has no TLS (bench/agent_start_bench.py).
    from meridio_debug.agent import tls

    tls.check_ca(ca_pem, where)
    if cert and key:
        try:
            with open(cert, "rb") as f:
                cert_pem = f.read()
            with open(key, "rb") as f:
                key_pem = f.read()
        except OSError as exc:
            raise ListenError(f"cannot read the agent's certificate or key: {exc}") from exc
    else:
        cert_pem, key_pem = tls.self_signed()
        # The controller pins this certificate, read from the container log.
        print(tls.CERT_BANNER, file=sys.stderr)
        print(cert_pem.decode().strip(), file=sys.stderr, flush=True)
    return TlsConfig(cert_pem, key_pem, ca_pem)


async def serve(address: ListenAddress, idle_timeout: float, tls: TlsConfig | None = None) -> int:
    from meridio_debug.agent.collectors.registry import default_collectors, watcher_factory
    from meridio_debug.agent.probe import add_probe_service
    from meridio_debug.agent.server import Activity, AgentService
    from meridio_debug.protos import agent_pb2_grpc as pb_grpc

    if address.scheme == "unix":
        check_unix_path(address.path)
        os.umask(0o077)  # the socket is 0600 from its creation: no window before a chmod
    elif tls is None:
        raise ListenError(
            f"refusing to listen on tcp {address.host} without mutual TLS: any process that "
            "reaches it (on loopback: every container of the pod) could capture and send "
            "packets; give --tls-client-ca/--tls-client-ca-env, or listen on a unix socket"
        )
    activity = Activity()
    service = AgentService(default_collectors, watcher_factory(), activity)
    server = grpc.aio.server(
        interceptors=[RequestGuard()],
        # Beyond this many RPCs at once grpc answers RESOURCE_EXHAUSTED itself.
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_concurrent_streams", MAX_CONCURRENT_RPCS),
            *TRANSPORT_OPTIONS,
        ],
    )
    pb_grpc.add_AgentServicer_to_server(service, server)
    add_probe_service(server, activity)
    try:
        if tls is not None:
            from meridio_debug.agent.tls import server_credentials

            creds = server_credentials(tls.cert_pem, tls.key_pem, tls.client_ca_pem)
            bound = server.add_secure_port(address.grpc_target, creds)
        else:
            bound = server.add_insecure_port(address.grpc_target)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {address.grpc_target}: {exc}") from exc
    if address.scheme == "tcp" and bound == 0:
        raise ListenError(f"cannot listen on {address.grpc_target}: address in use or unavailable")
    await server.start()
    if address.scheme == "unix":
        os.chmod(address.path, 0o600)
    log.info("meridio-debug-agent %s listening on %s", version.AGENT_VERSION, address.grpc_target)
    print(f"ready {address.grpc_target}", file=sys.stderr, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def idle_watch() -> None:
        trimmed_at = 0.0
        while not stop.is_set():
            await asyncio.sleep(1.0)
            idle = activity.idle_for()
            if idle_timeout and idle > idle_timeout:
                log.info("idle for %.0f s: exiting", idle_timeout)
                stop.set()
            elif idle > TRIM_AFTER_S and activity.last != trimmed_at:
                # Give freed heap back after a burst (gRPC threads leave it in their
                # arenas): RSS returns near the baseline instead of staying at the peak.
                trimmed_at = activity.last
                await asyncio.to_thread(trim_memory)

    watcher = asyncio.create_task(idle_watch())
    await stop.wait()
    watcher.cancel()
    await server.stop(grace=1.0)
    if address.scheme == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
    return 0


def trim_memory() -> None:
    """glibc's malloc_trim(0): return free heap pages to the kernel (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meridio-debug-agent",
        description="meridio-debug agent: serves a pod's network state over gRPC (read-only).",
    )
    parser.add_argument(
        "--listen",
        required=True,
        help="unix:/private-dir/agent.sock (a 0700 directory) or tcp:HOST:PORT (needs mTLS)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=900.0,
        help="exit after this many seconds without a call (0: never; default 900)",
    )
    parser.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require mutual TLS: clients need a certificate signed by this CA (allows any address)",
    )
    parser.add_argument(
        "--tls-client-ca-env",
        metavar="VAR",
        help="like --tls-client-ca, the CA certificate PEM read from this environment variable",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="the agent's certificate (default: a fresh self-signed one, printed to stderr)",
    )
    parser.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s agent %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.idle_timeout < 0:
        parser.error("--idle-timeout must be >= 0")
    try:
        address = parse_listen(args.listen)
        tls = tls_config(args.tls_client_ca, args.tls_client_ca_env, args.tls_cert, args.tls_key)
        return asyncio.run(serve(address, args.idle_timeout, tls))
    except ListenError as exc:
        print(f"meridio-debug-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
