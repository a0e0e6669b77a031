"""The lab: a Meridio-like trench in network namespaces on this host.

The contract is /work/shared/lab.md. This package is the Python API the CLI
(``meridio-debug lab up|down|status|traffic``) and other tools call::

    spec = build_spec(prefix="mdl-", lbs=2, proxies=2, targets_per_proxy=2)
    up(spec)                       # idempotent; waits until traffic can flow
    status("mdl-").healthy         # namespaces, processes, BGP sessions
    traffic("mdl-", connections=64).healthy
    load_spec("mdl-")              # the running lab's pods and roles, or None
    predict_target(spec, "200.100.0.7")   # which target the LBs pick, offline
    down("mdl-")

Nothing here prints: progress goes to ``logging`` and errors are
``LabError`` with a one-line message.
"""

from meridio_debug.controller.errors import LabError
from meridio_debug.controller.lab.build import down, up
from meridio_debug.controller.lab.jhash import predict_target
from meridio_debug.controller.lab.prereq import check_prerequisites
from meridio_debug.controller.lab.spec import (
    DEFAULT_PREFIX,
    FrontEnd,
    LabSpec,
    Link,
    LinkEnd,
    Node,
    Pod,
    Target,
    build_spec,
)
from meridio_debug.controller.lab.state import load_spec
from meridio_debug.controller.lab.status import LabStatus, status
from meridio_debug.controller.lab.traffic import TrafficResult, plan_probes, traffic

__all__ = [
    "DEFAULT_PREFIX",
    "FrontEnd",
    "LabError",
    "LabSpec",
    "LabStatus",
    "Link",
    "LinkEnd",
    "Node",
    "Pod",
    "Target",
    "TrafficResult",
    "build_spec",
    "check_prerequisites",
    "down",
    "load_spec",
    "plan_probes",
    "predict_target",
    "status",
    "traffic",
    "up",
]
