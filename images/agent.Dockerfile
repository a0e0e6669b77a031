# meridio-debug agent image: injected as an ephemeral container into Meridio pods.
# Small, with what the collectors need: libpcap (capture filters), iproute2 and
# nftables (nft -j), bird2's client (birdc, for users; the agent speaks bird's
# control socket itself), procps.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpcap0.8 iproute2 nftables bird2 procps \
 && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN pip install --no-cache-dir "/src[agent]" && rm -rf /src
# The agent listens on loopback/unix only unless mutual TLS is configured. When the
# controller injects it as an ephemeral container it sets the args itself (listen port
# derived from the container name, idle timeout, and for --direct the client CA in an env
# var: the agent then makes its own key and prints its certificate, see agent/tls.py).
ENTRYPOINT ["meridio-debug-agent"]
# TCP needs mutual TLS: the controller passes the CA certificate in this variable.
CMD ["--listen", "tcp:127.0.0.1:50051", "--tls-client-ca-env", "MERIDIO_DEBUG_CLIENT_CA", "--idle-timeout", "900"]
