"""The meridio-debug agent: a gRPC server that runs inside a pod's network namespace.

It is injected as an ephemeral container (or started as a child process in a
local namespace) and answers the controller with what the kernel, bird and
nfqlb see from inside the pod. It is read-only and must never die: an
ephemeral container is never restarted, so every failure becomes data (an
error section, a gRPC status), not an exit.

This package never imports kubernetes. pyroute2 (netlink: collectors, watch,
FIB lookups), psutil (collectors) and scapy (probe packets) are imported on
first use, not at start-up, so the agent serves within a second.
"""

from meridio_debug.agent._lazy_pyroute2 import install as _install_lazy_pyroute2

_install_lazy_pyroute2()
