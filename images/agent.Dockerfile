# meridio-debug agent image: injected as an ephemeral container into Meridio pods.
# What the agent needs and nothing more: Python, the agent's wheels (pinned in
# images/agent.constraints), libpcap (capture filters) and nft (nft -j). No shell tools:
# the agent reads the kernel through netlink and /proc, bird through its control socket.
# Built by images/build (reproducible: pinned wheels, SOURCE_DATE_EPOCH, rewritten timestamps).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE} AS build
ARG SOURCE_DATE_EPOCH
COPY dist/ /dist/
# The wheel is built here so the capture's C extensions fit this image's Python; the
# compiler stays in this stage. The import check fails the build if they did not compile.
# The build backend is pinned (no build isolation, which would fetch the newest setuptools):
# same checkout, same image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && mkdir /src && tar -xf /dist/src.tar -C /src \
 && python -m pip install --no-cache-dir setuptools==84.2.1 wheel==0.48.0 \
 && python -m pip wheel --no-cache-dir --no-deps --no-build-isolation -w /dist /src \
 && python -m venv /opt/meridio-debug \
 && /opt/meridio-debug/bin/pip install --no-cache-dir --no-compile \
      -c /dist/agent.constraints "$(ls /dist/meridio_debug-*.whl)[agent]" \
 && /opt/meridio-debug/bin/python -c "import meridio_debug.agent._blocks" \
 && /opt/meridio-debug/bin/pip uninstall -y pip \
 && find /opt/meridio-debug -name '__pycache__' -prune -exec rm -rf {} + \
 && PYTHONHASHSEED=0 /opt/meridio-debug/bin/python -m compileall -q -j 0 \
      --invalidation-mode unchecked-hash /opt/meridio-debug

FROM ${BASE}
ARG SOURCE_DATE_EPOCH
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpcap0.8 nftables \
 && rm -rf /var/lib/apt/lists/* /var/log/* /var/cache/ldconfig/aux-cache
COPY --from=build /opt/meridio-debug /opt/meridio-debug
# Bytecode is compiled here, for the standard library too, and never at run time: an
# ephemeral container starts from the image every time, so without .pyc files every agent
# would compile every module it imports. Measured (a venv installed --no-compile, no
# __pycache__, PYTHONDONTWRITEBYTECODE=1, tcp+mTLS until ready, median of 7): 230 ms of CPU
# without bytecode, 110 ms with it, a cost each injected pod would pay. unchecked-hash .pyc
# files (the image never changes: no source is read to validate them) and PYTHONHASHSEED=0
# keep the build reproducible (no mtimes, stable set order).
RUN PYTHONHASHSEED=0 python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
      "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" >/dev/null || true
ENV PATH=/opt/meridio-debug/bin:$PATH PYTHONDONTWRITEBYTECODE=1
# The controller sets the args when it injects the agent (listen port derived from the
# container name, idle timeout, and for --direct the client CA in an env var).
ENTRYPOINT ["meridio-debug-agent"]
# TCP needs mutual TLS: the controller passes the CA certificate in this variable.
CMD ["--listen", "tcp:127.0.0.1:50051", "--tls-client-ca-env", "MERIDIO_DEBUG_CLIENT_CA", "--idle-timeout", "900"]
