"""Capture filters are bounded: length, characters, and the cost of compiling them.

libpcap's compile cost grows about quadratically with the expression; the
agent compiles in a child process limited in memory and time, so a filter
that would cost more is refused (INVALID_ARGUMENT) and the agent never pays.
"""

from __future__ import annotations

import pytest

from meridio_debug.agent import capture


def test_a_normal_filter_compiles_to_bpf() -> None:
    program = capture.compile_filter("udp and port 4000")
    assert program and len(program) % 8 == 0


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        (" or ".join(["udp"] * 2000), "at most 4096"),
        ("udp\0 and and garbage", "control or non-ASCII"),
        ("udp\nand tcp", "control or non-ASCII"),
        ("udp and and", "invalid filter"),
    ],
    ids=["8 KB", "NUL", "newline", "syntax"],
)
def test_bad_filters_are_refused_with_a_short_message(expr: str, says: str) -> None:
    with pytest.raises(capture.InvalidCapture) as info:
        capture.compile_filter(expr)
    assert says in str(info.value) and len(str(info.value)) < 300


def test_a_filter_over_the_time_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "COMPILE_SECONDS", 0.001)
    with pytest.raises(capture.InvalidCapture, match=r"more than 0\.001 s to compile"):
        capture.compile_filter("udp")


def test_a_filter_over_the_memory_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "COMPILE_MEMORY", 8 << 20)
    with pytest.raises(capture.InvalidCapture, match="costs more than 8 MiB"):
        capture.compile_filter("udp")
