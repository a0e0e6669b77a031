"""``python -m meridio_debug.controller.cli``: the same as the ``meridio-debug`` script."""

import sys

from meridio_debug.controller.cli.main import main

sys.exit(main())
