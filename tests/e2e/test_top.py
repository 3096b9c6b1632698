"""`agentcg top` against a real broker and node agent (subprocesses, real cgroups and BPF): a
running call shows up with its tenant, lease, budget and a sane usage."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import AsyncClient

MiB = 1 << 20
# ~30 MB held (under the soft threshold of a 64 MiB budget: stays "running") until the file
# named by its argument exists (at most 60 s): until both snapshots are taken, however slow.
HOLD = """
import os, sys, time
held = bytearray(30_000_000)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.01)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, cgroup_write: Path, bcc_available: None):
    with LocalCluster(tmp_path_factory.mktemp("top"), node_memory="1G") as c:
        yield c


async def _top(cluster: LocalCluster, out: Path, *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentcg.clients.cli",
        "top",
        "--once",
        "--json",
        str(out),
        "--broker",
        cluster.broker_address,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},  # rich: no tty, 80 columns would cut the table
    )
    stdout, _ = await proc.communicate()
    return proc.returncode or 0, stdout.decode()


def test_top_shows_a_running_call(cluster: LocalCluster, tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncClient(cluster.broker_address) as client:
            await client.set_tenant("top-t", 1024 * MiB)
            done = tmp_path / "done"
            argv = [sys.executable, "-c", HOLD, str(done)]
            run = asyncio.create_task(client.run("top-t", 64 * MiB, argv, session="top-s"))
            node = cluster.node_addresses[0]
            # Wait until the call runs and holds its memory (the node's own view, via the SDK).
            for _ in range(100):
                calls = (await client.node_calls(node)).calls
                if calls and calls[0].usage_bytes >= 20 * MiB:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the call never showed up with its memory: {calls}")

            by_node = tmp_path / "by-node.json"
            by_broker = tmp_path / "by-broker.json"
            rc, text = await _top(cluster, by_node, "--node", node)
            assert rc == 0, text
            assert "top-t" in text and "running" in text, text
            rc, text = await _top(cluster, by_broker)  # nodes found through the broker
            assert rc == 0, text
            done.touch()
            result = await run
            assert result.outcome == "completed", result

        for path in (by_node, by_broker):
            snap = json.loads(path.read_text())
            [n] = snap["nodes"]
            assert n["address"] == node and n["capacity_bytes"] > 0
            [call] = n["calls"]
            assert (call["tenant"], call["session"]) == ("top-t", "top-s")
            assert call["budget_bytes"] == 64 * MiB
            assert 20 * MiB <= call["usage_bytes"] <= call["budget_bytes"], call
            assert call["usage_bytes"] <= call["peak_bytes"] <= call["budget_bytes"], call
            assert call["state"] == "running" and call["running_ms"] > 0, call
            assert call["lease_id"] == result.lease_id

    asyncio.run(main())
