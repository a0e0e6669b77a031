"""Versions exchanged in the GetInfo handshake.

PROTOCOL_VERSION changes only when a controller of the previous version could
no longer talk to this agent (a removed RPC or a changed meaning of a field).
"""

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = 2  # 2: PacketBatch frames as packed records (meta), not five repeated fields
