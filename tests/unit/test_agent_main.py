"""Agent start-up input checks: listen addresses and socket paths (no root needed)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from meridio_debug.agent.errors import ListenError
from meridio_debug.agent.main import check_unix_path, main, parse_listen


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("unix:/run/x/agent.sock", "unix:/run/x/agent.sock"),
        ("tcp:127.0.0.1:7000", "127.0.0.1:7000"),
        ("tcp:[::1]:7000", "[::1]:7000"),
    ],
)
def test_parse_listen_accepts(text: str, target: str) -> None:
    assert parse_listen(text).grpc_target == target


@pytest.mark.parametrize(
    "text",
    [
        "unix:relative.sock",
        "tcp:127.0.0.1",
        "tcp:localhost:7000",
        "tcp:127.0.0.1:0",
        "udp:1.2.3.4:5",
        "",
    ],
)
def test_parse_listen_rejects_with_expected_form(text: str) -> None:
    with pytest.raises(ListenError, match="expected unix:"):
        parse_listen(text)


def test_socket_path_in_use_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(ListenError, match="another process is serving there"):
            check_unix_path(path)
        assert os.path.exists(path)  # nothing taken away from the other process
    finally:
        live.close()


def test_stale_socket_is_replaced_and_plain_file_refused(tmp_path: Path) -> None:
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # bound, never listening: connect is refused
    check_unix_path(stale)
    assert not os.path.exists(stale)
    plain = tmp_path / "file"
    plain.write_text("data")
    with pytest.raises(ListenError, match="not a socket"):
        check_unix_path(str(plain))
    assert plain.read_text() == "data"


def test_missing_directory_is_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["--listen", f"unix:{tmp_path}/nope/agent.sock"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and "does not exist" in err


def test_non_loopback_tcp_without_tls_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--listen", "tcp:0.0.0.0:7777"]) == 1
    assert "without mutual TLS" in capsys.readouterr().err
