# The C extension of controller/packets/merge.py (see there); the signatures of its twins.
from collections.abc import Sequence

def ifindexes(meta: bytes, /) -> list[int]: ...
def prepare(data: bytes, meta: bytes, ifids: dict[int, int], flags: Sequence[int], /) -> bytes: ...
def merge(
    runs: Sequence[tuple[bytes, bytes, int]],
    mark: int,
    max_packets: int,
    budget: int,
    force_first: bool,
    counts: list[int],
    /,
) -> tuple[bytes, list[int], int, int, int]: ...
