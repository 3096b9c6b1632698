"""How fast an idle CPU of this host wakes: its cpuidle driver and, in a virtual machine with
the ``haltpoll`` driver, guest halt polling (kernel docs, *Guest halt polling*).

An idle vCPU that halts exits to the hypervisor, and the interrupt that ends its wait (a
disk's flush done, a packet in) has to wake it there first. With halt polling the vCPU polls
for up to ``guest_halt_poll_ns`` before it halts; the kernel's default is 200,000 ns, and a
host may boot with 0 (``haltpoll.guest_halt_poll_ns=0``) to spend no CPU on it. A broker that
waits on an ``fdatasync`` for every grant waits out that wake-up too: the host's setting, read
here so the benchmarks and the broker's start-up line can say what they ran on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["IdleSettings", "idle_settings"]

SYS = Path("/sys")


@dataclass(frozen=True, slots=True)
class IdleSettings:
    """The host's cpuidle driver and its guest halt polling (None: not readable here)."""

    driver: str | None  # /sys/devices/system/cpu/cpuidle/current_driver
    halt_poll_ns: int | None  # /sys/module/haltpoll/parameters/guest_halt_poll_ns

    @property
    def text(self) -> str:
        if self.driver is None:
            return "cpuidle driver not readable"
        if self.driver != "haltpoll" or self.halt_poll_ns is None:
            return f"cpuidle driver {self.driver}, no guest halt polling"
        return f"cpuidle driver haltpoll, guest_halt_poll_ns {self.halt_poll_ns}"


def idle_settings(root: Path = SYS) -> IdleSettings:
    def read(path: str) -> str | None:
        try:
            return (root / path).read_text().strip() or None
        except OSError:
            return None

    poll = read("module/haltpoll/parameters/guest_halt_poll_ns")
    return IdleSettings(
        read("devices/system/cpu/cpuidle/current_driver"),
        int(poll) if poll is not None and poll.isdigit() else None,
    )
