"""``meridio-debug``: the top-level parser, logging, exit codes and signals.

Each command group lives in its own module (snapshot/watch, capture, lab, inject/agents,
analyze/collect, trace, e2e) and adds its parser here; the arguments they share are in
``arguments``.

Conventions (Hubble, Inspektor Gadget, istioctl): data on stdout, logs and
errors on stderr, ``-o table|json|yaml``; exit codes 0 ok, 1 error, 2 usage,
3 findings at or above ``--fail-on``. A known failure is one line on stderr,
never a traceback. Usage errors (a NaN duration, a bad section, a missing
namespace) are found before any agent starts. SIGTERM is handled exactly like
Ctrl-C: the running command is cancelled, writes what it has, stops its
agents and removes their files.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from meridio_debug.controller.cli import analyze, capture, e2e, kube, lab, snapshot, trace
from meridio_debug.controller.cli.arguments import ArgumentParser
from meridio_debug.controller.errors import MeridioDebugError

log = logging.getLogger("meridio_debug")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FINDINGS = 0, 1, 2, 3

EPILOG = """exit codes: 0 ok, 1 error, 2 usage error, 3 findings at or above --fail-on"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="meridio-debug",
        description="Debug Meridio trenches: snapshot, watch, analyse, capture and trace, in many pods at once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=cmd_version)

    for group in (snapshot, capture, lab, kube, analyze, trace, e2e):
        group.add_parser(sub)
    return parser


def cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    print(f"meridio-debug {version('meridio-debug')}")
    return EXIT_OK


def _sigterm_as_ctrl_c(signum: int, frame: Any) -> None:
    """SIGTERM does what Ctrl-C does (asyncio.run's SIGINT handling, or KeyboardInterrupt)."""
    signal.raise_signal(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.WARNING - 10 * min(args.verbose, 2),
            format="%(asctime)s %(levelname)s %(message)s",
            stream=sys.stderr,
        )
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        code: int = args.func(args)
        return code
    except MeridioDebugError as exc:
        print(f"meridio-debug: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
