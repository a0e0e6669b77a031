"""Jobs against agents: snapshot, watch, analyze/collect, trace, active trace, capture, bundles.

Why a layer: each job is written once for every runtime (Kubernetes, local namespaces, the
lab) and every caller (the CLI, the Python API in ``controller/__init__.py``, tests and
benchmarks). Services hold no argparse and print nothing on stdout.
"""
