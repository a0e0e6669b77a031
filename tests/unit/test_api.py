"""The Python API of controller/__init__.py: every exported name resolves, and importing the
package stays cheap (no kubernetes client, no grpc until a name that needs it is used)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import meridio_debug.controller as api

INIT = Path(api.__file__)


def test_every_exported_name_resolves_to_what_type_checkers_see() -> None:
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    # the TYPE_CHECKING imports (what mypy and editors see) name exactly the exported API
    tree = ast.parse(INIT.read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If))
    seen = {
        a.asname or a.name for n in guarded.body if isinstance(n, ast.ImportFrom) for a in n.names
    }
    assert seen == set(api.__all__) == set(api._API)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        api.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_package_imports_neither_kubernetes_nor_grpc() -> None:
    code = (
        "import sys, meridio_debug.controller as c\n"
        "print(sorted(m for m in ('kubernetes', 'grpc', 'scapy') if m in sys.modules))\n"
        "c.gather\n"
        "print('kubernetes' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "False"  # gathering needs no kubernetes client either


def test_the_readme_example_imports_only_exported_names() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(block)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imported and imported <= set(api.__all__)
