"""The lab's nfqlb: what it runs, the queue rules it sends, and nfqlb's hash and Maglev table."""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
from pathlib import Path

import pytest

from meridio_debug.controller.lab import build_spec
from meridio_debug.controller.lab.jhash import lab_lookup, predict_target
from meridio_debug.controller.lab.nft_queue import batch, errors_in, meridio_rules, rule_body
from meridio_debug.controller.lab.render import (
    NFQLB_FLOWLB_ARGS,
    nfqlb_commands,
    nft_ruleset,
)
from meridio_debug.controller.trace import nfqlb_hash

DATA = Path(__file__).parent / "data" / "nfqlb"


def test_flowlb_runs_as_meridios_stateless_lb():
    assert NFQLB_FLOWLB_ARGS == (
        "flowlb",
        "--promiscuous_ping",
        "--queue=0:3",
        "--qlength=1024",
        "--hash_mode=0",
    )


def test_nfqlb_commands_of_the_default_lab():
    cmds = [" ".join(c) for c in nfqlb_commands(build_spec())]
    assert cmds == [
        "init --ownfw=0 --shm=tshm-stream-a --M=10000 --N=100",
        "activate --index=0 --shm=tshm-stream-a 5001",
        "activate --index=1 --shm=tshm-stream-a 5002",
        "activate --index=2 --shm=tshm-stream-a 5003",
        "activate --index=3 --shm=tshm-stream-a 5004",
        "flow-set --name=tshm-stream-a-flow-a --target=tshm-stream-a --prio=1 "
        "--protocols=tcp,udp --dsts=20.0.0.1/32,2000::1/128 --dports=4000-4003",
    ]


def test_nfqlb_scaled_lab_sizes_the_shm_by_targets():
    assert nfqlb_commands(build_spec(lbs=1, proxies=3, targets_per_proxy=5))[0][-2:] == (
        "--M=10000",
        "--N=100",
    )
    spec = build_spec(lbs=1, proxies=11, targets_per_proxy=10)
    assert nfqlb_commands(spec)[0][-2:] == ("--M=11000", "--N=110")


def test_nfqlb_big_lab_activates_every_target_in_one_command_in_identifier_order():
    spec = build_spec(lbs=1, proxies=10, targets_per_proxy=100)
    cmds = nfqlb_commands(spec)
    activations = [c for c in cmds if c[0] == "activate"]
    assert activations == [
        ("activate", "--shm=tshm-stream-a", *(str(5000 + i) for i in range(1, 1001)))
    ]
    assert cmds[0][-2:] == ("--M=100000", "--N=1000")


def test_nft_ruleset_queues_vip_traffic_instead_of_marking():
    text = nft_ruleset(build_spec())
    assert "jhash" not in text and "meta mark set jhash" not in text
    assert text.count("queue num 0-3") == 4
    for chain in ("chain nfqlb {", "chain nfqlb-local {", "chain snat-local {"):
        assert chain in text
    assert "ip saddr set 20.0.0.1 meta mark set 0" in text
    assert "table inet meridio-defrag" in text
    compat = nft_ruleset(build_spec(), native_queue=False)
    assert "queue" not in compat and "chain nfqlb-local {" in compat


def test_nft_queue_rule_has_nfqueue_target_for_queues_0_to_3():
    body = rule_body("meridio-nfqlb", meridio_rules()[0], 0, 4)
    assert b"meridio-nfqlb\0" in body and b"ipv4-vips\0" in body
    assert b"NFQUEUE\0" in body
    assert struct.pack("=HHH", 0, 4, 0) in body  # xt_NFQ_info_v3
    v6_local = rule_body("meridio-nfqlb", meridio_rules()[3], 0, 4)
    assert b"nfqlb-local\0" in v6_local and b"ipv6-vips\0" in v6_local
    data = batch("meridio-nfqlb", meridio_rules(), 0, 4)
    # begin, four rules, end; each message length is in its header
    offset, kinds = 0, []
    while offset < len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        kinds.append(kind)
        offset += length
    assert offset == len(data)
    assert kinds == [0x10, (10 << 8) | 6, (10 << 8) | 6, (10 << 8) | 6, (10 << 8) | 6, 0x11]


def test_errors_in_reads_acks_and_refusals():
    def error(seq: int, errno: int) -> bytes:
        return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -errno) + b"\0" * 16

    assert errors_in(error(2, 0) + error(3, 2)) == [(2, 0), (3, 2)]


def test_glibc_rand_matches_this_libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.srand(1)
    assert nfqlb_hash.glibc_rand(50) == [libc.rand() for _ in range(50)]


def test_maglev_lookup_equals_the_table_nfqlb_wrote():
    data = (DATA / "tshm-stream-a.bin").read_bytes()
    m, n = struct.unpack_from("=II", data, 4)
    written = struct.unpack_from(f"={m}i", data, 16)
    assert nfqlb_hash.prime_below(400) == m == 397
    assert nfqlb_hash.maglev_lookup(m, n, [0, 2, 3]) == written
    assert nfqlb_hash.maglev_lookup(m, n, []) == (-1,) * m


def test_flow_key_is_nfqlbs_ct_key():
    key = nfqlb_hash.flow_key("200.100.0.1", "20.0.0.1", "tcp", sport=40000, dport=4000)
    assert len(key) == 40
    assert key[:16] == b"\0" * 10 + b"\xff\xff" + socket.inet_aton("200.100.0.1")
    assert key[32:] == b"\0\0" + b"\x06\0" + struct.pack("!HH", 40000, 4000)
    assert nfqlb_hash.djb2(b"") == 5381 and nfqlb_hash.djb2(b"a") == 5381 * 33 + 97


def test_nfqlb_prediction_needs_ports_and_spreads_over_every_target():
    spec = build_spec()
    with pytest.raises(ValueError, match="ports"):
        predict_target(spec, "200.100.0.1")
    got = {
        predict_target(spec, src, proto="tcp", sport=sport, dport=4000)
        for src in spec.gateway.client_sources4[:8]
        for sport in range(40000, 40008)
    }
    assert got == {t.pod for t in spec.targets}
    assert len(lab_lookup(spec)) == 9973
