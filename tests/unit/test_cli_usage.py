"""Bad command lines: exit 2 with one line before any agent starts; a missing namespace: exit 1.

What a user notices: a typo or a NaN never starts agents in every pod only to
fail there, and ``--netns does-not-exist`` says so on one line for every
command instead of a finding about Kubernetes RBAC or an empty bundle.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meridio_debug.controller import cli

FLOW = "tcp 10.0.0.1:1000 -> 20.0.0.1:80"
USAGE = [
    ["watch", "--netns", "x", "--duration", "nan"],
    ["watch", "--netns", "x", "--duration", "-1"],
    ["watch", "--netns", "x", "--duration", "inf"],
    ["capture", "--netns", "x", "--duration", "1e9", "-w", "out.pcapng"],
    ["capture", "--netns", "x", "--duration", "nan", "-w", "out.pcapng"],
    ["capture", "--netns", "x", "--snaplen", "999999", "-w", "out.pcapng"],
    ["snapshot", "--netns", "x", "--section", "bogus"],
    ["snapshot", "--lab", "--prefix", "Bad Prefix"],
    ["lab", "up", "--prefix", "ab/c"],
    ["lab", "up", "--lbs", "99"],
    ["lab", "down", "--prefix", "x" * 40],
    ["trace", "--netns", "x", "--flow", FLOW, "--active", "--duration", "nan"],
]


@pytest.mark.parametrize("argv", USAGE, ids=[" ".join(a) for a in USAGE])
def test_usage_errors_exit_2_with_one_line_before_any_agent(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meridio-debug: "), err
    assert os.listdir(tmp_path) == []  # no agent directory, no output file


MISSING = [
    ["snapshot"],
    ["watch"],
    ["analyze"],
    ["collect", "-o", "bundle.tar.gz"],
    ["capture", "-w", "out.pcapng"],
    ["trace", "--flow", FLOW],
    ["trace", "--flow", FLOW, "--active", "--probe"],
]


@pytest.mark.parametrize(
    "argv", MISSING, ids=[a[0] + (" --active" if "--active" in a else "") for a in MISSING]
)
def test_a_missing_namespace_is_exit_1_one_line_for_every_command(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    ns = f"mdt-missing-{os.getpid()}"
    assert cli.main([*argv, "--netns", ns]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"network namespace {ns!r} does not exist" in err, err
    assert os.listdir(tmp_path) == []


def test_lab_status_of_a_lab_that_is_not_up_says_so_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["lab", "status", "--prefix", f"mdz{os.getpid() % 1000}-"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no lab with prefix" in err and err.count("\n") == 1
