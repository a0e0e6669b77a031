"""Packets on the controller side: the pcapng writer and the one scapy dissector.

Why apart: both are used by capture and the active trace, neither needs an agent, and scapy
(~0.5 s to import) is imported lazily by ``dissect`` alone (import-linter checks it).
"""
