"""The capture's per-packet loops in C; everything else about the package is in pyproject.toml.

Why C: agent/blocks.py and controller/packets/merge.py say why (a Python object
per captured packet cost 13-15x tcpdump's CPU). Both are optional: without a
compiler the install still works, with their byte-identical Python twins
(slower); scripts/setup and tests/unit/test_packaging.py insist on them where we
develop and test (tests/unit/test_capture_native.py::test_the_extensions_are_built_here).

Why here and not in pyproject.toml: setuptools' ``[tool.setuptools.ext-modules]``
table is still experimental (a warning at every build, "likely to change"), and
the build fetches the newest setuptools; ``Extension`` in setup.py is its
stable interface.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "meridio_debug.agent._blocks",
            sources=["agent/_blocks.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
        Extension(
            "meridio_debug.controller.packets._epb",
            sources=["controller/packets/_epb.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
    ]
)
