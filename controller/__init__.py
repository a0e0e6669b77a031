"""The meridio-debug controller: CLI, Python API, runtimes, analysis and reports.

It reaches agents through a runtime (local namespaces and the lab here; the
Kubernetes runtime for clusters), talks to them over gRPC and turns what they
return into plain data. It never imports pyroute2 or scapy; only its
Kubernetes runtime imports kubernetes.
"""
