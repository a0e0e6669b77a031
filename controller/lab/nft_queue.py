"""Add meridio-nfqlb's queue rules as the xtables NFQUEUE target, for kernels without nft queue.

Why this exists: Meridio's stateless-lb writes ``ip daddr @ipv4-vips counter queue num 0-3``
through netlink (nft's ``queue`` expression, module nft_queue). Kernels built without
CONFIG_NFT_QUEUE (the machines this project runs on) refuse that expression, but have the
xtables NFQUEUE target and nft_compat, which hand packets to the same nfnetlink queues. The
nft tool cannot write an ``xt`` expression, so this module sends the rule itself: one
NFT_MSG_NEWRULE per rule in one netlink batch, expressions exactly as nft would make them for
``ip daddr @ipv4-vips counter`` followed by the NFQUEUE target (revision 3, queues 0-3).
``nft -j list ruleset`` then shows the rule with ``{"xt": {"type": "target", "name":
"NFQUEUE"}}``; the analysis counts that as a queue rule.

Run inside the LB's namespace: ``ip netns exec NS python -m
meridio_debug.controller.lab.nft_queue --first 0 --total 4``. Pure message building is
separated from the socket, so the bytes are testable without root.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWRULE = 6
NFPROTO_INET = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NFT_REG_1 = 1
NFT_META_NFPROTO, NFT_META_L4PROTO = 15, 16
NFT_PAYLOAD_NETWORK_HEADER = 1
XT_NFQUEUE_REVISION = 3


@dataclass(frozen=True)
class QueueRule:
    """``[meta l4proto <icmp>] <ip|ip6> daddr @<vip_set> counter`` + NFQUEUE, in ``chain``."""

    chain: str
    family: int  # 4 or 6
    vip_set: str
    icmp_only: bool = False


def meridio_rules() -> tuple[QueueRule, ...]:
    """The four queue rules of Meridio's meridio-nfqlb table (reference §2.3)."""
    return (
        QueueRule("nfqlb", 4, "ipv4-vips"),
        QueueRule("nfqlb", 6, "ipv6-vips"),
        QueueRule("nfqlb-local", 4, "ipv4-vips", icmp_only=True),
        QueueRule("nfqlb-local", 6, "ipv6-vips", icmp_only=True),
    )


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">I", value))  # nf_tables attributes are big-endian


def _expr(name: str, *data: bytes) -> bytes:
    return _nest(1, _str(1, name), _nest(2, *data))  # NFTA_LIST_ELEM{EXPR_NAME, EXPR_DATA}


def _cmp_eq(value: bytes) -> bytes:
    return _expr("cmp", _u32(1, NFT_REG_1), _u32(2, 0), _nest(3, _attr(1, value)))


def rule_body(table: str, rule: QueueRule, first: int, total: int) -> bytes:
    """NFT_MSG_NEWRULE attributes for ``rule`` queueing to ``first`` .. ``first+total-1``."""
    v6 = rule.family == 6
    exprs = [
        _expr("meta", _u32(1, NFT_REG_1), _u32(2, NFT_META_NFPROTO)),
        _cmp_eq(bytes([socket.AF_INET6 if v6 else socket.AF_INET])),
    ]
    if rule.icmp_only:
        exprs.append(_expr("meta", _u32(1, NFT_REG_1), _u32(2, NFT_META_L4PROTO)))
        exprs.append(_cmp_eq(bytes([58 if v6 else 1])))  # ipv6-icmp / icmp
    offset, length = (24, 16) if v6 else (16, 4)  # destination address in the IP header
    exprs.append(
        _expr(
            "payload",
            _u32(1, NFT_REG_1),
            _u32(2, NFT_PAYLOAD_NETWORK_HEADER),
            _u32(3, offset),
            _u32(4, length),
        )
    )
    exprs.append(_expr("lookup", _str(1, rule.vip_set), _u32(2, NFT_REG_1)))
    exprs.append(_expr("counter"))
    # struct xt_NFQ_info_v3 { __u16 queuenum, queues_total, flags; } in host order.
    info = struct.pack("=HHH", first, total, 0)
    exprs.append(_expr("target", _str(1, "NFQUEUE"), _u32(2, XT_NFQUEUE_REVISION), _attr(3, info)))
    return _str(1, table) + _str(2, rule.chain) + _nest(4, *exprs)


def _message(kind: int, flags: int, body: bytes, seq: int, *, inet: bool) -> bytes:
    """One nfnetlink message: batch markers go to the nftables subsystem, rules to inet."""
    family, res_id = (NFPROTO_INET, 0) if inet else (0, NFNL_SUBSYS_NFTABLES)
    payload = struct.pack("=BBH", family, 0, socket.htons(res_id)) + body
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def batch(table: str, rules: tuple[QueueRule, ...], first: int, total: int) -> bytes:
    """One netlink batch adding ``rules`` (each acknowledged, sequence numbers 2..)."""
    out = _message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, b"", 1, inet=False)
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK
    for seq, rule in enumerate(rules, start=2):
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE
        out += _message(kind, flags, rule_body(table, rule, first, total), seq, inet=True)
    out += _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, b"", len(rules) + 2, inet=False)
    return out


def errors_in(reply: bytes) -> list[tuple[int, int]]:
    """(sequence, errno) of every NLMSG_ERROR in ``reply``; errno 0 is an acknowledgement."""
    out = []
    offset = 0
    while offset + 16 <= len(reply):
        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", reply, offset)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            out.append((seq, -struct.unpack_from("=i", reply, offset + 16)[0]))
        offset += (length + 3) & ~3
    return out


def add_rules(table: str, rules: tuple[QueueRule, ...], first: int, total: int) -> None:
    """Send the batch in the current network namespace; OSError naming the first refusal."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sk:
        sk.settimeout(5.0)
        sk.bind((0, 0))
        sk.send(batch(table, rules, first, total))
        pending = set(range(2, len(rules) + 2))
        while pending:
            for seq, err in errors_in(sk.recv(65536)):
                if err:
                    rule = rules[seq - 2] if 2 <= seq < len(rules) + 2 else None
                    what = f"{rule.chain} {rule.vip_set}" if rule else f"message {seq}"
                    raise OSError(err, f"adding the NFQUEUE rule ({what}): {os.strerror(err)}")
                pending.discard(seq)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="meridio-nfqlb")
    parser.add_argument("--first", type=int, default=0, help="first queue number")
    parser.add_argument("--total", type=int, default=4, help="number of queues")
    args = parser.parse_args(argv)
    try:
        add_rules(args.table, meridio_rules(), args.first, args.total)
    except OSError as exc:
        print(f"nft_queue: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
