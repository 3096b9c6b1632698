"""The ready file a server writes once it serves (``--ready-file``): what a launcher waits for.

Line 1 is the gRPC address (``host:port``, the real port when the server was asked for port 0),
as it always was. Each further line names another listener of the process and its address,
``metrics 127.0.0.1:41234``, present only when that listener is on. The file appears whole
(written aside, then renamed), so a reader that sees it sees every line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Ready", "read_ready_file", "write_ready_file"]


@dataclass(frozen=True)
class Ready:
    address: str  # the gRPC listener
    listeners: Mapping[str, str] = field(default_factory=dict)  # name -> host:port


def write_ready_file(path: Path, address: str, listeners: Mapping[str, str] | None = None) -> None:
    # No trailing newline: with no other listener the file is the bare address, as it was.
    lines = [address] + [f"{name} {addr}" for name, addr in sorted((listeners or {}).items())]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


def read_ready_file(path: Path) -> Ready:
    first, *rest = path.read_text().strip().splitlines()
    listeners = dict(line.split(" ", 1) for line in rest if " " in line)
    return Ready(first.strip(), listeners)
