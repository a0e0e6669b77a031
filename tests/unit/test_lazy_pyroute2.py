"""The agent imports only the pyroute2 it uses, and pyroute2 stays whole for everyone else.

Each case runs in a fresh interpreter: what is imported is process state.
"""

from __future__ import annotations

import subprocess
import sys


def run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.strip()


def test_agent_netlink_does_not_import_all_of_pyroute2() -> None:
    out = run(
        "import sys, meridio_debug.agent.rtnl, meridio_debug.agent.collectors.netlink,"
        " meridio_debug.agent.watch\n"
        "print(sorted(m for m in ('pyroute2.ndb', 'pyroute2.ipdb', 'pyroute2.conntrack',"
        " 'pyroute2.ipset', 'pyroute2.nslink') if m in sys.modules))"
    )
    assert out == "[]"


def test_agent_netlink_decodes_after_the_narrow_import() -> None:
    out = run(
        "import socket\n"
        "from meridio_debug.agent import rtnl\n"
        "from pyroute2.netlink.rtnl import RTM_GETLINK\n"
        "from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg\n"
        "with rtnl.RtnlSocket() as s:\n"
        "    print(sorted({m.get_attr('IFLA_IFNAME') for m in"
        " s.dump(ifinfmsg(), RTM_GETLINK)} & {'lo'}))"
    )
    assert out == "['lo']"


def test_top_level_names_still_work_after_the_agent() -> None:
    out = run(
        "import meridio_debug.agent.rtnl\n"
        "from pyroute2 import IPRoute, NDB\n"
        "import pyroute2\n"
        "with IPRoute() as ipr:\n"
        "    print(type(pyroute2).__name__, bool(ipr.link_lookup(ifname='lo')), NDB.__name__)"
    )
    assert out == "module True NDB"


def test_nothing_changes_when_pyroute2_is_already_imported() -> None:
    out = run(
        "import pyroute2\n"
        "from meridio_debug.agent._lazy_pyroute2 import install\n"
        "print(install(), type(pyroute2).__name__)"
    )
    assert out == "False module"
