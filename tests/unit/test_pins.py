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
