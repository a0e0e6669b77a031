# meridio-debug controller image: the CLI, for the in-cluster Job (deploy/).
FROM python:3.11-slim-bookworm
COPY . /src
RUN pip install --no-cache-dir "/src[controller]" && rm -rf /src
ENTRYPOINT ["meridio-debug"]
