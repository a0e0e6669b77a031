"""``meridio-debug capture``: the command line of a capture in many pods at once.

Parses, opens the output (a pcapng file, ``-`` for stdout, or ``--print`` lines) and
prints what each pod captured and dropped; the capture itself (merge by watermark,
cooperative stop) is services/capture.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from typing import Any, BinaryIO

from meridio_debug.controller.cli.arguments import (
    MAX_STREAM_S,
    add_target_args,
    int_range,
    make_runtime,
    seconds,
)
from meridio_debug.controller.errors import MeridioDebugError, UsageError
from meridio_debug.controller.packets.pcapng import Writer
from meridio_debug.controller.services.capture import (
    MAX_SNAPLEN,
    Options,
    PcapngSink,
    Printer,
    Sink,
    run_capture,
    summary_lines,
)

HELP = "capture packets in pods at once into one pcapng (or print them), live to Wireshark"
DESCRIPTION = """\
Capture in every selected pod at once with the agent's TPACKET_V3 ring and a
kernel BPF filter, and write ONE pcapng: packets in time order, one interface
per pod and interface named POD/IFACE, direction per packet, and interface
statistics (received, dropped) at the end. Runs until --duration, --count or
--max-bytes is reached, or Ctrl-C / SIGTERM; always leaves a valid file.
Prints on stderr what was captured and dropped, per pod."""
EPILOG = """\
examples:
  meridio-debug capture --lab lb-fe-a proxy-a -f 'udp port 4000' --duration 10 -w vip.pcapng
  meridio-debug capture --netns ns1 --netns ns2 -i eth0 -c 1000 -w two.pcapng
  meridio-debug capture --lab lb-fe-a -w - | wireshark -k -i -
  meridio-debug capture --lab --print -f 'host 20.0.0.1'
  meridio-debug capture --lab -w ring.pcapng --rotate 5 --max-bytes 100000000

exit codes: 0 ok, 1 a pod could not capture, 2 usage error"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "capture",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(p)
    p.add_argument(
        "-i",
        "--interface",
        action="append",
        default=[],
        metavar="IFACE",
        help="interface in each pod (repeatable; default: any = all interfaces)",
    )
    p.add_argument("-f", "--filter", default="", help="BPF filter, pcap-filter(7) syntax")
    p.add_argument(
        "--duration",
        type=seconds(MAX_STREAM_S),
        default=0.0,
        help="stop after S seconds (default: Ctrl-C, at most 1 h)",
    )
    p.add_argument("-c", "--count", type=int, default=0, help="stop after N packets in total")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=0,
        help="stop when the file reaches N bytes (with --rotate: size of each file)",
    )
    p.add_argument(
        "--snaplen",
        type=int_range(0, MAX_SNAPLEN),
        default=0,
        help=f"bytes kept per packet (default and at most {MAX_SNAPLEN})",
    )
    p.add_argument(
        "--rotate",
        type=int,
        default=0,
        metavar="N",
        help="keep a ring of N files of --max-bytes each (FILE0.pcapng, FILE1.pcapng, ...)",
    )
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-w", "--write", metavar="FILE", help="pcapng file, or - for stdout")
    out.add_argument(
        "--print", action="store_true", help="print one decoded line per packet instead"
    )
    p.set_defaults(func=cmd_capture)


def options_from(args: argparse.Namespace) -> Options:
    if args.duration < 0 or args.count < 0 or args.max_bytes < 0 or args.snaplen < 0:
        raise UsageError("--duration, --count, --max-bytes and --snaplen must be >= 0")
    if args.rotate < 0 or (args.rotate and not args.max_bytes):
        raise UsageError("--rotate N needs N >= 1 and --max-bytes (the size of each file)")
    if args.rotate and args.write in (None, "-"):
        raise UsageError("--rotate writes files: give -w FILE")
    interfaces = tuple(args.interface) or ("any",)
    return Options(
        interfaces=interfaces,
        filter=args.filter,
        duration=args.duration,
        count=args.count,
        max_bytes=args.max_bytes,
        snaplen=args.snaplen,
        rotate=args.rotate,
    )


def cmd_capture(args: argparse.Namespace) -> int:

    options = options_from(args)
    runtime = make_runtime(args)

    def log(text: str) -> None:
        print(f"meridio-debug: {text}", file=sys.stderr, flush=True)

    sink: Sink
    if args.print:
        sink = Printer(sys.stdout)
    else:
        stream: BinaryIO | None = sys.stdout.buffer if args.write == "-" else None
        try:
            writer = Writer(
                None if stream else args.write,
                stream,
                max_bytes=options.max_bytes,
                rotate=options.rotate,
            )
        except OSError as exc:
            raise MeridioDebugError(f"cannot write {args.write}: {exc}") from exc
        sink = PcapngSink(writer)
    states = asyncio.run(run_capture(runtime, options, sink, log))
    if not any(st.capture_id for st in states):
        # Nothing could start (bad filter, unknown interface...): _ready said why, once per
        # pod; a header-only file would only look like an empty capture.
        if isinstance(sink, PcapngSink) and args.write != "-":
            for name in sink.writer.files:
                with contextlib.suppress(OSError):
                    os.unlink(name)
        return 1
    for line in summary_lines(states):
        log(line)
    if isinstance(sink, PcapngSink) and sink.writer.files:
        log(f"wrote {sink.packets} packets to {', '.join(sink.writer.files)}")
    return 1 if any(st.error for st in states) else 0
