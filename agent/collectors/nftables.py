"""The nftables ruleset of the namespace, as ``nft -j list ruleset`` prints it.

Why the nft binary and not netlink: the kernel's nftables netlink messages
are bytecode (registers, expressions); turning them back into rules is what
libnftables does, and its JSON output is the stable, documented form
(libnftables-json(5)). Meridio's tables (meridio-nfqlb, meridio-defrag,
meridio-nat, meridio-metrics) are analysed from that JSON, kept as it is in
``Snapshot.nftables`` (a protobuf Struct: numbers arrive as doubles).

Read-only: only ``list ruleset`` is ever run.

In-process through libnftables (what the nft binary is a front end of) when the
library loads: the same JSON (checked equal on the lab's LBs) for ~0.1-0.5 ms of
CPU instead of ~4-7 ms to start ``nft`` (fork, exec, dynamic linking), which was
a tenth of a one-shot agent's CPU on a 1,000-target lab. The binary stays the
fallback, with its timeout; the library call is one netlink dump of the kernel's
own tables, answered synchronously.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
from typing import Any

from meridio_debug.agent.collectors.procs import run_readonly
from meridio_debug.agent.errors import CollectorError
from meridio_debug.protos import agent_pb2 as pb

NFT_NOT_FOUND = "nft not found: install nftables in the agent image"
# PATH of a non-root shell (or a minimal image) often lacks the sbin directories.
_NFT_FALLBACKS = ("/usr/sbin/nft", "/sbin/nft", "/usr/local/sbin/nft", "/usr/bin/nft")


LIBNFTABLES = "libnftables.so.1"
NFT_CTX_OUTPUT_JSON = 1 << 4  # libnftables.h


@functools.cache
def libnftables() -> Any | None:
    """libnftables loaded with its prototypes, None when this system has none."""
    try:
        lib = ctypes.CDLL(LIBNFTABLES)
    except OSError:
        return None
    ptr = ctypes.c_void_p
    lib.nft_ctx_new.restype = ptr
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ptr]
    lib.nft_ctx_output_set_flags.argtypes = [ptr, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [ptr]
    lib.nft_ctx_buffer_error.argtypes = [ptr]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ptr]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ptr]
    lib.nft_run_cmd_from_buffer.argtypes = [ptr, ctypes.c_char_p]
    return lib


def list_ruleset_json(lib: Any) -> tuple[int, str, str]:
    """``nft -j list ruleset`` through libnftables: (return code, stdout, stderr)."""
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        return 1, "", "libnftables: cannot make a context"
    try:
        lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        code = int(lib.nft_run_cmd_from_buffer(ctx, b"list ruleset"))
        out = lib.nft_ctx_get_output_buffer(ctx) or b""
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
        return code, out.decode(errors="replace"), err.decode(errors="replace")
    finally:
        lib.nft_ctx_free(ctx)


def find_nft() -> str | None:
    """Path of the nft binary, None when there is none."""
    found = shutil.which("nft")
    if found:
        return found
    for path in _NFT_FALLBACKS:
        if os.access(path, os.X_OK):
            return path
    return None


def parse_ruleset_json(text: str) -> dict[str, Any]:
    """Parse ``nft -j list ruleset`` output; an empty output is an empty ruleset.

    Raises CollectorError when the text is not the documented shape
    (an object with an ``nftables`` array).
    """
    if not text.strip():
        return {"nftables": []}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CollectorError(f"nft -j printed invalid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("nftables"), list):
        raise CollectorError("nft -j output has no 'nftables' array")
    return data


def explain_failure(returncode: int, stderr: str) -> str:
    """One line saying why nft failed, with what to do for the common causes."""
    detail = " ".join(stderr.split()) or f"exit status {returncode}"
    lowered = detail.lower()
    if "operation not permitted" in lowered or "permission denied" in lowered:
        return (
            "nft: permission denied listing the ruleset "
            f"(the agent needs CAP_NET_ADMIN in the pod's network namespace): {detail}"
        )
    if "protocol not supported" in lowered:
        return f"nft: the kernel has no nf_tables support: {detail}"
    return f"nft -j list ruleset failed: {detail}"


class NftablesCollector:
    """Section ``nftables``: the whole ruleset as JSON, in ``Snapshot.nftables``."""

    name = "nftables"

    def __init__(self, nft: str | None = None, timeout: float = 5.0) -> None:
        self._nft = nft
        self._timeout = timeout

    def _binary(self) -> str | None:
        return self._nft or find_nft()

    def available(self) -> tuple[bool, str]:
        if self._nft is None and libnftables() is not None:
            return True, f"{LIBNFTABLES} (in-process)"
        nft = self._binary()
        if nft is None:
            return False, NFT_NOT_FOUND
        return True, nft

    def _run(self) -> tuple[int, str, str]:
        lib = libnftables() if self._nft is None else None
        if lib is not None:
            return list_ruleset_json(lib)
        nft = self._binary()
        if nft is None:
            raise CollectorError(NFT_NOT_FOUND)
        try:
            result = run_readonly([nft, "-j", "list", "ruleset"], timeout=self._timeout)
        except FileNotFoundError as exc:
            raise CollectorError(NFT_NOT_FOUND) from exc
        except PermissionError as exc:
            raise CollectorError(f"nft: cannot execute {nft}: {exc}") from exc
        return result.returncode, result.stdout, result.stderr

    def collect(self, snap: pb.Snapshot) -> None:
        code, stdout, stderr = self._run()
        if code != 0:
            raise CollectorError(explain_failure(code, stderr))
        ruleset = parse_ruleset_json(stdout)
        snap.nftables.Clear()
        snap.nftables.update(ruleset)
