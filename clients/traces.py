"""Agent memory traces (the shared/traces JSONL format) and the tool-call curves cut from them.

Pure: parsing and arithmetic on plain data. A trace's memory is the whole container's; a tool
call's curve is the container's memory inside [start, end] above the level just before the call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["MB", "ToolCall", "Trace", "load_traces", "sample_traces_path"]

MB = 1_000_000  # the traces' mem_mb is decimal MB (podman stats)


@dataclass(frozen=True, slots=True)
class ToolCall:
    start_s: float
    end_s: float
    tool: str
    command: str
    base_mb: float  # container memory just before the call
    curve: tuple[
        tuple[float, float], ...
    ]  # (seconds since call start, MB above base), clipped >= 0

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end_s - self.start_s)

    @property
    def peak_rise_mb(self) -> float:
        return max((mb for _, mb in self.curve), default=0.0)

    @property
    def command_class(self) -> str:
        words = self.command.replace("/", " ").split()
        for w in words:
            if w in ("pytest", "pip", "python", "python3", "make", "git", "npm", "tox", "uv"):
                return w
        return "shell" if words else "other"


@dataclass(frozen=True, slots=True)
class Trace:
    task: str
    interval_s: float
    samples: tuple[tuple[float, float], ...]  # (t_s, mem_mb)
    tool_calls: tuple[ToolCall, ...]

    @property
    def duration_s(self) -> float:
        return self.samples[-1][0] if self.samples else 0.0

    @property
    def peak_mb(self) -> float:
        return max((mb for _, mb in self.samples), default=0.0)

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> Trace:
        raw = obj.get("samples")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"trace {obj.get('task')!r}: no samples")
        samples = tuple((float(s[0]), float(s[1])) for s in raw)
        calls: list[ToolCall] = []
        raw_calls = obj.get("tool_calls") or []
        assert isinstance(raw_calls, list)
        for c in raw_calls:
            start, end = float(c[0]), float(c[1])
            before = [mb for t, mb in samples if t <= start]
            base = before[-1] if before else samples[0][1]
            inside = [(t - start, max(0.0, mb - base)) for t, mb in samples if start <= t <= end]
            calls.append(
                ToolCall(
                    start, end, str(c[2]), str(c[3]) if len(c) > 3 else "", base, tuple(inside)
                )
            )
        return cls(
            task=str(obj.get("task", "?")),
            # A JSON number (object-typed here); float() rejects anything else at runtime.
            interval_s=float(obj.get("interval_s", 1.0)),  # type: ignore[arg-type]
            samples=samples,
            tool_calls=tuple(calls),
        )


def load_traces(path: Path) -> Iterator[Trace]:
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield Trace.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError, IndexError) as e:
                    raise ValueError(f"{path}:{lineno}: not a trace line: {e}") from None


def sample_traces_path() -> Path:
    """The small sample shipped with agentcg (see clients/traces/README.md)."""
    return Path(str(resources.files("agentcg.clients") / "traces" / "glm-local-sample.jsonl"))
