"""The installed package: every folder is mapped, nothing generic lands in site-packages."""

from __future__ import annotations

import tomllib
from pathlib import Path

import meridio_debug.agent
import meridio_debug.controller

TOP = Path(__file__).resolve().parents[2]
MAPPING = {
    "agent": "meridio_debug.agent",
    "controller": "meridio_debug.controller",
    "protos": "meridio_debug.protos",
}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((TOP / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in MAPPING.items():
        for init in (TOP / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(TOP / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_installed_names_are_namespaced() -> None:
    assert meridio_debug.agent.__name__ == "meridio_debug.agent"
    assert meridio_debug.controller.__doc__


def test_the_agent_reports_the_version_its_image_is_tagged_with() -> None:
    """GetInfo's agent_version, the package version and deploy/job.yaml's tag agree: the
    controller's default --image is tagged with the package version (k8s_spec.DEFAULT_IMAGE)."""
    from meridio_debug.agent.version import AGENT_VERSION

    version = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]["version"]
    assert version == AGENT_VERSION
    assert f"meridio-debug-controller:{version}" in (TOP / "deploy/job.yaml").read_text()
