"""Prerequisites of the lab: root, five tools and nfqlb, said in one line when missing.

Why its own module: a user who runs ``lab up`` without root or without bird2
should read what to do, not a traceback from the middle of ``ip``. The
checker takes the euid and PATH as arguments so tests can exercise every
message without being unprivileged and without faking the kernel.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from meridio_debug.controller.errors import LabError

# tool -> Debian package that ships it
REQUIRED_TOOLS: dict[str, str] = {
    "ip": "iproute2",
    "nft": "nftables",
    "bird": "bird2",
    "birdc": "bird2",
    "sysctl": "procps",
}
NFQLB_VERSION = "1.2.0"
# Where scripts/build-nfqlb puts its build (outside any checkout, keyed by version).
NFQLB_CACHE = f"/var/cache/meridio-debug/nfqlb-{NFQLB_VERSION}/nfqlb"
NFQLB_HINT = (
    f"run scripts/setup (it builds nfqlb {NFQLB_VERSION} into {NFQLB_CACHE}), or put nfqlb on PATH"
)
# root's PATH on Debian has these; sudo or a minimal environment may not.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Tools:
    """Absolute paths of the programs the lab runs."""

    ip: str
    nft: str
    bird: str
    birdc: str
    sysctl: str
    nfqlb: str = ""  # "" when not found: only the nft-jhash marking works then


def find_nfqlb(path: str | None = None, cache: str = NFQLB_CACHE) -> str | None:
    """scripts/build-nfqlb's cached build, else ``nfqlb`` on ``path``; None when neither."""
    if os.access(cache, os.X_OK):
        return cache
    if path is None:
        path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN_DIRS])
    return shutil.which("nfqlb", path=path)


def find_tools(path: str | None = None) -> tuple[dict[str, str], list[str]]:
    """(found tool -> absolute path, missing tool names) on ``path``.

    With ``path=None`` the process PATH plus the sbin directories is searched.
    """
    if path is None:
        path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN_DIRS])
    found: dict[str, str] = {}
    missing: list[str] = []
    for tool in REQUIRED_TOOLS:
        where = shutil.which(tool, path=path)
        if where is None:
            missing.append(tool)
        else:
            found[tool] = where
    return found, missing


def check_root_and_ip(action: str, euid: int | None = None, path: str | None = None) -> str:
    """The path of ``ip`` for commands that only enter or delete namespaces (down, traffic)."""
    _check_root(action, euid)
    found, missing = find_tools(path)
    if "ip" in missing:
        raise LabError(f"{action} needs ip (not on PATH): apt-get install iproute2")
    return found["ip"]


def _check_root(action: str, euid: int | None) -> None:
    uid = os.geteuid() if euid is None else euid
    if uid != 0:
        raise LabError(
            f"{action} needs root, it manages network namespaces (running as uid {uid}): "
            "run it as root, e.g. with sudo"
        )


def check_prerequisites(
    euid: int | None = None, path: str | None = None, action: str = "lab up"
) -> Tools:
    """The tools to use, or LabError (one line) saying what is missing and how to get it."""
    _check_root(action, euid)
    found, missing = find_tools(path)
    if missing:
        packages = sorted({REQUIRED_TOOLS[t] for t in missing})
        raise LabError(
            f"{action} needs {', '.join(missing)} (not on PATH): "
            f"install the Debian package{'s' if len(packages) > 1 else ''} "
            f"{' '.join(packages)} (apt-get install {' '.join(packages)})"
        )
    return Tools(
        ip=found["ip"],
        nft=found["nft"],
        bird=found["bird"],
        birdc=found["birdc"],
        sysctl=found["sysctl"],
        nfqlb=find_nfqlb(path) or "",
    )
