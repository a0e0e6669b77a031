# meridio-debug controller image: the CLI, for the in-cluster Job (deploy/).
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
      -c /dist/controller.constraints "$(ls /dist/meridio_debug-*.whl)[controller]" \
 && /opt/meridio-debug/bin/python -c "import meridio_debug.controller.packets._epb" \
 && /opt/meridio-debug/bin/pip uninstall -y pip \
 && find /opt/meridio-debug -name '__pycache__' -prune -exec rm -rf {} + \
 && PYTHONHASHSEED=0 /opt/meridio-debug/bin/python -m compileall -q -j 0 \
      --invalidation-mode unchecked-hash /opt/meridio-debug

FROM ${BASE}
COPY --from=build /opt/meridio-debug /opt/meridio-debug
# Bytecode compiled here, stdlib too, never at run time (images/agent.Dockerfile says why).
RUN PYTHONHASHSEED=0 python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
      "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" >/dev/null || true
ENV PATH=/opt/meridio-debug/bin:$PATH PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["meridio-debug"]
