"""Evidence bundles: a replay is exactly the live input, and bad files are one-line errors.

The snapshots are small hand-built ``pb.Snapshot`` messages with every kind of
field a bundle must carry back unchanged (nested messages, enums, 64-bit
counters, the nft ruleset Struct with nulls in it, sysctls), plus an
unreachable pod.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from meridio_debug.controller import cli
from meridio_debug.controller.analysis import analyze
from meridio_debug.controller.errors import BundleError
from meridio_debug.controller.model import TrenchConfig
from meridio_debug.controller.report.snapshot import PodSnapshot
from meridio_debug.controller.runtime import PodRef
from meridio_debug.controller.services.bundle import (
    FORMAT_VERSION,
    Evidence,
    read_bundle,
    trench_state,
    write_bundle,
)
from meridio_debug.protos import agent_pb2 as pb


def lb_snapshot() -> pb.Snapshot:
    snap = pb.Snapshot(taken_unix_ns=1_795_217_434_557_583_550)
    snap.info.agent_version = "0.1.0"
    snap.info.netns = "net:[4026533044]"
    snap.info.collectors.add(name="links", available=True, reason="rtnetlink")
    for name in ("links", "addresses", "rules", "routes", "sysctls", "nftables"):
        snap.sections.add(name=name, state=pb.SectionStatus.OK, duration_ms=1.5)
    snap.sections.add(name="nfqlb", state=pb.SectionStatus.ABSENT, message="not running")
    link = snap.links.add(index=2, name="ext-vlan0", kind="veth", state="UP", mtu=1500)
    link.flags.extend(["UP", "LOWER_UP"])
    link.stats.rx_bytes = 2**40 + 3  # a 64-bit counter stays exact
    snap.addresses.add(ifname="ext-vlan0", address="169.254.100.2", prefixlen=24, family=2)
    snap.rules.add(priority=100, src="20.0.0.1", src_len=32, table=4096, family=2)
    route = snap.routes.add(dst="default", table=4096, family=2, gateway="169.254.100.150")
    route.nexthops.add(gateway="169.254.100.150", dev="ext-vlan0", weight=1)
    snap.sysctls.add(key="net.ipv4.conf.all.rp_filter", value="0")
    ruleset = {
        "nftables": [
            {"table": {"family": "inet", "name": "meridio-defrag", "handle": 1}},
            {
                "rule": {
                    "chain": "pre-defrag",
                    "expr": [{"notrack": None}],
                    "handle": 4,
                    "table": "meridio-defrag",
                }
            },
        ]
    }
    struct = struct_pb2.Struct()
    struct.update(ruleset)
    snap.nftables.CopyFrom(struct)
    return snap


def evidence() -> Evidence:
    return Evidence(
        items=(
            PodSnapshot(PodRef("lb-fe-a", "lb-fe", "mdl-lb-fe-a", "lab"), lb_snapshot()),
            PodSnapshot(
                PodRef("target-b2", "target", "mdl-target-b2", "lab"),
                None,
                "target-b2: agent exited with code 1 before serving: boom",
            ),
        ),
        config=TrenchConfig(name="red", vips=("20.0.0.1/32",), external_interface="ext-vlan0"),
        source="lab mdl-",
        runtime="lab",
        created_unix_ns=1_795_217_434_000_000_000,
    )


def test_a_bundle_replays_exactly_what_was_collected(tmp_path: Path) -> None:
    path = tmp_path / "b.tar.gz"
    original = evidence()
    meta = write_bundle(original, path, ["meridio-debug", "collect", "--lab"], "0.1.0")
    back = read_bundle(path)
    assert [i.pod for i in back.items] == [i.pod for i in original.items]
    assert back.items[0].snapshot == original.items[0].snapshot  # the very same message
    assert back.items[1].snapshot is None
    assert "boom" in back.items[1].error
    assert back.config == original.config
    assert trench_state(back) == trench_state(original)
    live = analyze(trench_state(original))
    replay = analyze(trench_state(back))
    assert [f.to_dict() for f in replay.findings] == [f.to_dict() for f in live.findings]
    assert replay.runs == live.runs
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["command_line"] == ["meridio-debug", "collect", "--lab"]


def test_meta_json_describes_the_bundle(tmp_path: Path) -> None:
    path = tmp_path / "b.tar.gz"
    write_bundle(evidence(), path, ["x"], "0.1.0")
    with tarfile.open(path, "r:gz") as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("meta.json"))  # type: ignore[arg-type]
        pod = json.load(tar.extractfile("pods/lb-fe-a.json"))  # type: ignore[arg-type]
    assert names == ["meta.json", "pods/lb-fe-a.json", "pods/target-b2.json"]
    assert meta["kind"] == "meridio-debug/bundle"
    assert meta["created"].startswith("2026-11-20T")
    assert meta["meridio_debug_version"] == "0.1.0"
    assert [(p["name"], p["role"], p["reachable"]) for p in meta["pods"]] == [
        ("lb-fe-a", "lb-fe", True),
        ("target-b2", "target", False),
    ]
    assert meta["pods"][0]["agent"]["agent_version"] == "0.1.0"
    # the pod file is the `snapshot -o json` per-pod object
    assert pod["pod"] == "lb-fe-a" and pod["sysctls"] == {"net.ipv4.conf.all.rp_filter": "0"}
    assert pod["links"][0]["stats"]["rx_bytes"] == 2**40 + 3


# --------------------------------------------------------------------------- bad input


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _good(tmp_path: Path) -> bytes:
    path = tmp_path / "good.tar.gz"
    write_bundle(evidence(), path, ["x"], "0.1.0")
    return path.read_bytes()


def _meta(tmp_path: Path, **changes: object) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(_good(tmp_path)), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    meta = json.loads(members["meta.json"])
    meta.update(changes)
    members["meta.json"] = json.dumps(meta).encode()
    return _tar_gz(members)


BAD: dict[str, object] = {
    "truncated": lambda tmp: _good(tmp)[:-200],
    "truncated early": lambda tmp: _good(tmp)[:60],
    "random bytes": lambda tmp: bytes(range(256)) * 8,
    "empty file": lambda tmp: b"",
    "gzip but not tar": lambda tmp: gzip.compress(b"hello world\n" * 50),
    "tar without meta": lambda tmp: _tar_gz({"hello.txt": b"hi"}),
    "meta not json": lambda tmp: _tar_gz({"meta.json": b"{nope"}),
    "meta of something else": lambda tmp: _tar_gz({"meta.json": b'{"kind": "other"}'}),
    "other version": lambda tmp: _meta(tmp, format_version=99),
    "pod file missing": lambda tmp: _tar_gz(
        {
            "meta.json": json.dumps(
                {"kind": "meridio-debug/bundle", "format_version": 1, "pods": [{"name": "x"}]}
            ).encode()
        }
    ),
}

EXPECTED = {
    "truncated": "truncated or corrupt",
    "truncated early": "truncated or corrupt",
    "random bytes": "not a meridio-debug bundle",
    "empty file": "not a meridio-debug bundle",
    "gzip but not tar": "not a meridio-debug bundle",
    "tar without meta": "no meta.json",
    "meta not json": "not valid JSON",
    "meta of something else": "not a meridio-debug bundle",
    "other version": "format version 99",
    "pod file missing": "pods/x.json is missing",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bundles_are_one_line_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(BAD[case](tmp_path))  # type: ignore[operator]
    with pytest.raises(BundleError) as info:
        read_bundle(path)
    message = str(info.value)
    assert EXPECTED[case] in message
    assert "\n" not in message


def test_missing_bundle_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle file"):
        read_bundle(tmp_path / "nope.tar.gz")


@pytest.mark.parametrize("case", ["truncated", "tar without meta", "other version"])
def test_cli_says_one_line_and_exits_1(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(BAD[case](tmp_path))  # type: ignore[operator]
    assert cli.main(["analyze", "--from", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meridio-debug: ")
    assert "Traceback" not in err


def test_cli_replays_a_bundle_with_every_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "b.tar.gz"
    write_bundle(evidence(), path, ["x"], "0.1.0")
    # target-b2 is unreachable: MDB002 is an error, so exit 3
    assert cli.main(["analyze", "--from", str(path), "-o", "json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert ("MDB002", "target-b2") in {(f["code"], f["pod"]) for f in doc["findings"]}
    html = tmp_path / "r.html"
    rc = cli.main(
        ["analyze", "--from", str(path), "--suppress", "MDB002", "--fail-on", "never",
         "--report", str(html)]
    )  # fmt: skip
    assert rc == 0
    assert "target-b2" in html.read_text()
    assert "target-b2  target   UNREACHABLE" in capsys.readouterr().out


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analyze"]) == 2
    assert cli.main(["analyze", "--from", "x.tar.gz", "--report", "r.pdf"]) == 2
    assert cli.main(["analyze", "--from", "x.tar.gz", "--lab"]) == 2
    assert cli.main(["collect", "-o", str(tmp_path / "b.tar.gz")]) == 2
    capsys.readouterr()
    assert cli.main(["analyze", "--list-checks"]) == 0
    out = capsys.readouterr().out
    assert "MDB101" in out and "error" in out and "MDB405" in out


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, read without holding them (a bomb member)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


def _bomb(path: Path, sizes: list[int]) -> None:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for i, size in enumerate(sizes):
            info = tarfile.TarInfo(f"pods/p{i}.json")
            info.size = size
            tar.addfile(info, _Zeros(size))


def _deep_meta(depth: int) -> bytes:
    return b'{"kind": "meridio-debug/bundle", "format_version": 1, "x": ' + (
        b"[" * depth + b"]" * depth + b"}"
    )


def _run_analyze(path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """``analyze --from`` as a process: (result, its peak RSS in MiB)."""
    code = (
        "import resource, sys\n"
        "from meridio_debug.controller import cli\n"
        "rc = cli.main(['analyze', '--from', sys.argv[1]])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stdout)\n"
        "sys.exit(rc)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return res, float(res.stdout.strip().splitlines()[-1])


BOMBS = {
    # sizes from the tar headers, refused before any data is read
    "one member of 200 MiB": lambda p: _bomb(p, [200 << 20]),
    "three members of 60 MiB": lambda p: _bomb(p, [60 << 20] * 3),
    "20,000 empty members": lambda p: p.write_bytes(
        _tar_gz({f"pods/p{i}.json": b"" for i in range(20_000)})
    ),
    "meta.json 5,000 deep": lambda p: p.write_bytes(_tar_gz({"meta.json": _deep_meta(5000)})),
    "meta.json 100 deep": lambda p: p.write_bytes(_tar_gz({"meta.json": _deep_meta(100)})),
}


@pytest.mark.parametrize("case", list(BOMBS))
def test_bundle_bombs_are_one_line_exit_1_within_memory(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bomb.tar.gz"
    BOMBS[case](path)  # type: ignore[operator]
    res, peak_mib = _run_analyze(path)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("meridio-debug: "), res.stderr
    assert "not a meridio-debug bundle" in res.stderr
    # the stated limit: MAX_TOTAL_BYTES (128 MiB) of data beyond the interpreter's ~100 MiB
    assert peak_mib < 260, peak_mib


def test_a_deep_pod_file_is_refused(tmp_path: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(_good(tmp_path)), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    pod = next(n for n in members if n.startswith("pods/"))
    members[pod] = b'{"snapshot": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    path = tmp_path / "deep.tar.gz"
    path.write_bytes(_tar_gz(members))
    with pytest.raises(BundleError, match="deeper than 64 levels"):
        read_bundle(path)
