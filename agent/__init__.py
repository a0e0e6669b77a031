"""The meridio-debug agent: a gRPC server that runs inside a pod's network namespace.

It is injected as an ephemeral container (or started as a child process in a
local namespace) and answers the controller with what the kernel, bird and
nfqlb see from inside the pod. It is read-only and must never die: an
ephemeral container is never restarted, so every failure becomes data (an
error section, a gRPC status), not an exit.

This package never imports kubernetes; only its collectors import pyroute2,
psutil and scapy.
"""
