"""Shared fixtures of the root tier (real namespaces). Keep it small."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest

_counter = itertools.count()


@pytest.fixture(scope="session")
def lab_prefix() -> Callable[[], str]:
    """A factory of lab prefixes unique to this test run (``mdt<pid>a-``, ``mdt<pid>b-``, ...).

    Short on purpose (<= 8 characters) and never ``mdl-``, so tests do not
    touch a lab someone runs by hand.
    """

    def make() -> str:
        return f"mdt{os.getpid() % 1000}{chr(97 + next(_counter) % 26)}-"

    return make
