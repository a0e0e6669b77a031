# The C extension of agent/blocks.py (see there); the signature of its twin.
from collections.abc import Sequence
from typing import Any

def parse(
    buf: Any, offsets: Sequence[int], max_packets: int, max_bytes: int, /
) -> tuple[bytes, bytes, dict[int, int], int, int]: ...
