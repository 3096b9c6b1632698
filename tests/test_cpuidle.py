"""Reading the host's cpuidle settings: fixture trees of /sys (oomd's fixtures pattern), and
this host's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentcg.cpuidle import IdleSettings, idle_settings

DRIVER = "devices/system/cpu/cpuidle/current_driver"
POLL = "module/haltpoll/parameters/guest_halt_poll_ns"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "settings", "text"),
    [
        (
            {DRIVER: "haltpoll\n", POLL: "0\n"},
            IdleSettings("haltpoll", 0),
            "cpuidle driver haltpoll, guest_halt_poll_ns 0",
        ),
        (
            {DRIVER: "haltpoll\n", POLL: "200000\n"},
            IdleSettings("haltpoll", 200_000),
            "cpuidle driver haltpoll, guest_halt_poll_ns 200000",
        ),
        (
            {DRIVER: "intel_idle\n"},
            IdleSettings("intel_idle", None),
            "cpuidle driver intel_idle, no guest halt polling",
        ),
        (
            # The governor's module loaded beside another driver: it does not poll then.
            {DRIVER: "acpi_idle\n", POLL: "200000\n"},
            IdleSettings("acpi_idle", 200_000),
            "cpuidle driver acpi_idle, no guest halt polling",
        ),
        (
            {DRIVER: "none\n"},
            IdleSettings("none", None),
            "cpuidle driver none, no guest halt polling",
        ),
        ({POLL: "garbage"}, IdleSettings(None, None), "cpuidle driver not readable"),
        ({}, IdleSettings(None, None), "cpuidle driver not readable"),
    ],
)
def test_idle_settings_from_a_sys_tree(
    tmp_path: Path, files: dict[str, str], settings: IdleSettings, text: str
) -> None:
    got = idle_settings(_tree(tmp_path, files))
    assert got == settings
    assert got.text == text


def test_this_hosts_idle_settings_are_what_sys_holds() -> None:
    driver = Path("/sys", DRIVER)
    poll = Path("/sys", POLL)
    got = idle_settings()
    assert got.driver == (driver.read_text().strip() if driver.exists() else None)
    assert got.halt_poll_ns == (int(poll.read_text()) if poll.exists() else None)
