"""The command line: one module per command group, the shared arguments in ``arguments``.

It parses and prints, nothing else: every job runs in ``services``, every ``-o`` renderer
lives in ``report``. ``main`` is the console entry point (``meridio-debug``,
``kubectl meridio-debug``).
"""

from meridio_debug.controller.cli.main import main

__all__ = ["main"]
