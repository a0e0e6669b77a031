"""The nftables ruleset of the namespace, as ``nft -j list ruleset`` prints it.

Why the nft binary and not netlink: the kernel's nftables netlink messages
are bytecode (registers, expressions); turning them back into rules is what
libnftables does, and its JSON output is the stable, documented form
(libnftables-json(5)). Meridio's tables (meridio-nfqlb, meridio-defrag,
meridio-nat, meridio-metrics) are analysed from that JSON, kept as it is in
``Snapshot.nftables`` (a protobuf Struct: numbers arrive as doubles).

Read-only: only ``list ruleset`` is ever run.
"""

from __future__ import annotations

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
        nft = self._binary()
        if nft is None:
            return False, NFT_NOT_FOUND
        return True, nft

    def collect(self, snap: pb.Snapshot) -> None:
        nft = self._binary()
        if nft is None:
            raise CollectorError(NFT_NOT_FOUND)
        try:
            result = run_readonly([nft, "-j", "list", "ruleset"], timeout=self._timeout)
        except FileNotFoundError as exc:
            raise CollectorError(NFT_NOT_FOUND) from exc
        except PermissionError as exc:
            raise CollectorError(f"nft: cannot execute {nft}: {exc}") from exc
        if result.returncode != 0:
            raise CollectorError(explain_failure(result.returncode, result.stderr))
        ruleset = parse_ruleset_json(result.stdout)
        snap.nftables.Clear()
        snap.nftables.update(ruleset)
