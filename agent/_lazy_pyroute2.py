"""pyroute2 without its package ``__init__`` until something asks for a top-level name.

Why: ``import pyroute2`` runs ``pyroute2/__init__.py``, which imports every
pyroute2 API at once (IPDB, NDB, conntrack, ipset, ipvs, nl80211, wireguard,
plan9, ...): ~85 modules and ~50 ms of CPU. The agent needs only the rtnetlink
socket, message classes and marshal, and every injected ephemeral container
pays the import again (48 pods on a first run: ~2.4 CPU-seconds on a node).

``install()`` puts the pyroute2 package into ``sys.modules`` without running
its ``__init__`` (nothing is imported yet: the agent still imports pyroute2 on
first use), so ``from pyroute2.netlink.rtnl... import ...`` later loads only
those submodules. The package stays whole for everyone else: the first time a
name that is not a submodule is asked of it (``from pyroute2 import
IPRoute``), ``__init__`` runs on the same module object and the name is
served. One order matters and agent/rtnl.py keeps it: ``pyroute2.iproute``
before ``pyroute2.netlink.rtnl.iprsocket`` (they import each other; pyroute2's
``__init__`` imports iproute first).

If pyroute2 is already imported, missing, or lacks the submodules named here,
nothing is changed and pyroute2 is imported the ordinary way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

_LOCK = threading.RLock()  # one thread runs __init__; the others wait for it
_RUNNING: set[str] = set()  # packages whose __init__ is running (re-entry: plain AttributeError)


class _LazyPackage(types.ModuleType):
    """A package module whose ``__init__`` runs on the first non-submodule lookup."""

    __spec__: ModuleSpec

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"{self.__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{self.__name__}.{name}":
                raise
        with _LOCK:
            if type(self) is _LazyPackage and self.__name__ not in _RUNNING:
                loader = self.__spec__.loader
                assert loader is not None
                _RUNNING.add(self.__name__)
                try:
                    loader.exec_module(self)  # a failure leaves it lazy: the next lookup retries
                finally:
                    _RUNNING.discard(self.__name__)
                object.__setattr__(self, "__class__", types.ModuleType)  # plain from here on
        return object.__getattribute__(self, name)


NEEDED = ("iproute", "netlink.rtnl.iprsocket", "netlink.rtnl.marshal")


def _has_module(where: Path, dotted: str) -> bool:
    """A file check, not ``find_spec``: that would import the parent packages."""
    path = where.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def install(package: str = "pyroute2") -> bool:
    """Make ``package`` lazy; True if installed. Never raises, imports no submodule."""
    if package in sys.modules:
        return False
    spec = importlib.util.find_spec(package)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _LazyPackage
    sys.modules[package] = module
    where = [Path(p) for p in spec.submodule_search_locations]
    found = all(any(_has_module(w, n) for w in where) for n in NEEDED)
    if not found:
        del sys.modules[package]
    return found
