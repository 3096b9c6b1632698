"""A call's output is not its memory: a tool call that prints far more than its budget (a
verbose build) runs to its end within it, on a real node agent (real cgroups, BPF, spool).

Its output is cached in its memory cgroup until written to disk. Before, a call writing 400 MiB
under a 64 MiB budget in a tenant of 80 MiB was killed when the broker could not grow it for
what was only its output (``tenant t: memory quota exhausted``); with room, it was grown to
512 MiB. Now the node writes that output out and drops it from the call's memory at its limit
(``enforcement.FlushOutput``) and asks for nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster, scrape_metric
from agentcg.clients.sdk import Client

MiB = 1 << 20
BUDGET = 64 * MiB
OUTPUT = 256 * MiB


@pytest.mark.timeout(300)
def test_a_call_printing_four_times_its_budget_finishes_within_it(
    tmp_path: Path, cgroup_write: Path, bcc_available: None
) -> None:
    args = ["--spool-dir", str(tmp_path / "spool"), "--metrics-listen", "127.0.0.1:0"]
    got = [0, 0]

    def sink(stream: int, data: bytes) -> None:
        got[stream - 1] += len(data)
        assert data.count(0) == len(data)  # what it wrote: /dev/zero

    with (
        LocalCluster(tmp_path / "cluster", node_memory="2G", node_args=args) as cluster,
        Client(cluster.broker_address) as client,
    ):
        client.set_tenant("t", 80 * MiB)  # no room to grow it past 80 MiB
        result = client.run(
            "t", BUDGET, ["sh", "-c", f"head -c {OUTPUT} /dev/zero"], on_output=sink
        )
        flushed = scrape_metric(
            cluster.metrics_address("node0"), "agentcg_node_output_flushed_bytes_total"
        )
    assert (result.exit_code, result.outcome) == (0, "completed"), result
    assert got == [OUTPUT, 0]
    assert result.budget_bytes == BUDGET  # never grown: nothing asked for
    assert "kill" not in result.actions and "grow" not in result.actions, result.actions
    assert result.peak_bytes <= BUDGET
    # The node flushed it (its own estimate of what it dropped).
    assert flushed >= BUDGET // 2
