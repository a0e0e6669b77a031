"""The agents' certificate pins (runtime/tls.Pins): by pod UID and container name, best effort."""

from __future__ import annotations

import os
import time
from pathlib import Path

from meridio_debug.controller.runtime.tls import PIN_MAX_AGE_S, Pins

UID = "0b6f3c1e-8a3d-4b8e-9a51-6f0f2c1d7e55"
PEM = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


def test_a_pin_is_found_by_uid_and_name_only(tmp_path: Path) -> None:
    pins = Pins(tmp_path / "agents")
    assert pins.get(UID, "meridio-debug-1a2b3c4d") is None
    pins.put(UID, "meridio-debug-1a2b3c4d", PEM)
    assert pins.get(UID, "meridio-debug-1a2b3c4d") == PEM
    assert Pins(tmp_path / "agents").get(UID, "meridio-debug-1a2b3c4d") == PEM  # next run
    assert pins.get(UID, "meridio-debug-1a2b3c4d-2") is None  # the next generation: not pinned
    assert pins.get("another-uid", "meridio-debug-1a2b3c4d") is None  # the pod made again
    assert (tmp_path / "agents").stat().st_mode & 0o777 == 0o700


def test_names_that_are_no_uid_or_container_name_are_never_paths(tmp_path: Path) -> None:
    pins = Pins(tmp_path / "agents")
    for uid, name in (("../x", "a"), (UID, "../../etc/passwd"), ("", "a"), (UID, "A B")):
        pins.put(uid, name, PEM)
        assert pins.get(uid, name) is None
    assert not (tmp_path / "agents").exists() or not os.listdir(tmp_path / "agents")


def test_old_pins_are_swept_and_an_unwritable_directory_is_no_error(tmp_path: Path) -> None:
    pins = Pins(tmp_path / "agents")
    pins.put(UID, "old", PEM)
    old = tmp_path / "agents" / f"{UID}_old.pem"
    past = time.time() - PIN_MAX_AGE_S - 60
    os.utime(old, (past, past))
    Pins(tmp_path / "agents").put(UID, "new", PEM)  # a new run sweeps once
    assert not old.exists()
    (tmp_path / "file").write_text("not a directory")
    Pins(tmp_path / "file" / "agents").put(UID, "x", PEM)  # best effort: no exception


def test_a_pin_others_could_have_written_is_not_trusted(tmp_path: Path) -> None:
    """A pin decides which agent is trusted: only from this user's own private files."""
    agents = tmp_path / "agents"
    pins = Pins(agents)
    pins.put(UID, "c", PEM)
    pin = agents / f"{UID}_c.pem"
    assert pin.stat().st_mode & 0o777 == 0o600
    pin.chmod(0o622)  # writable by others: someone could have planted it
    assert pins.get(UID, "c") is None
    pin.chmod(0o600)
    agents.chmod(0o777)  # a shared cache directory: any file in it could be planted
    assert pins.get(UID, "c") is None
    pins.put(UID, "d", PEM)  # and nothing is written there either
    assert not (agents / f"{UID}_d.pem").exists()
    agents.chmod(0o700)
    assert pins.get(UID, "c") == PEM
    planted = tmp_path / "planted.pem"
    planted.write_bytes(PEM)
    (agents / f"{UID}_e.pem").symlink_to(planted)  # a symlink to elsewhere
    assert pins.get(UID, "e") is None
    linked = tmp_path / "linked"
    linked.symlink_to(agents)  # the directory itself a symlink
    assert Pins(linked).get(UID, "c") is None
