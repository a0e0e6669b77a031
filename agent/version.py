"""Versions exchanged in the GetInfo handshake.

PROTOCOL_VERSION changes only when a controller of the previous version could
no longer talk to this agent (a removed RPC or a changed meaning of a field).
A new PROTOCOL_VERSION needs a new AGENT_VERSION (pyproject.toml's version):
the controller's default image is tagged with it and injected with
imagePullPolicy IfNotPresent, so a node holding the old tag would run old agents.
"""

AGENT_VERSION = "0.2.0"
PROTOCOL_VERSION = 2  # 2: PacketBatch frames as packed records (meta), not five repeated fields
