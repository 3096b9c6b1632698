"""The README's SDK example, run as it stands against a real broker and a real node agent (a
real tool call in its own cgroup): what the README says it prints is what it prints."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path

from agentcg.clients.cluster import LocalCluster

README = Path(__file__).resolve().parents[2] / "README.md"


def sdk_example() -> str:
    section = README.read_text().split("## From an agent framework: the SDK", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "no python block in the README's SDK section"
    return found.group(1)


def test_the_readme_sdk_example_runs_and_prints_what_it_says(tmp_path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(sdk_example(), "README.md", "exec"), namespace)  # noqa: S102 - our README
    main = namespace["main"]
    out = io.StringIO()
    with LocalCluster(tmp_path, nodes=1, log_level="WARNING") as cluster:
        with contextlib.redirect_stdout(out):
            asyncio.run(main(cluster.broker_address))  # type: ignore[operator]
    assert out.getvalue().splitlines() == [
        "tests passed",
        "completed 0 True",
        "tenant_quota 512 MiB fit now",
        "pytest 1 peaks; granted 256 MiB",
    ]
