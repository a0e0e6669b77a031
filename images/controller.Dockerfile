# meridio-debug controller image: the CLI, for the in-cluster Job (deploy/).
# Built by images/build (reproducible: pinned wheels, SOURCE_DATE_EPOCH, rewritten timestamps).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE} AS build
COPY dist/ /dist/
RUN python -m venv /opt/meridio-debug \
 && /opt/meridio-debug/bin/pip install --no-cache-dir --no-compile \
      -c /dist/controller.constraints "$(ls /dist/meridio_debug-*.whl)[controller]" \
 && /opt/meridio-debug/bin/pip uninstall -y pip \
 && find /opt/meridio-debug -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE}
COPY --from=build /opt/meridio-debug /opt/meridio-debug
ENV PATH=/opt/meridio-debug/bin:$PATH PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["meridio-debug"]
