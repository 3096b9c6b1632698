"""A node agent whose cgroup tree lives under a given memory cgroup (the replay's pool).

``agentcg node --cgroup-root NAME`` nests the node's tree under the node process's own memory
cgroup. The replay needs the tool calls' cgroups inside the pool cgroup that also holds the
agents, without charging the node process itself to the pool; until the node takes a base path
(see the replay note), this launcher starts the real node composition root with the v1 driver's
``base`` set to the pool.

``python -m agentcg.clients.replay_node --cgroup-base DIR --cgroup-root NAME --broker ADDR
--node-id ID --memory BYTES [--growth-factor F] --ready-file PATH --log-level LEVEL``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agentcg.node import main as node_main
from agentcg.node.cgroup import CgroupDriver, CgroupV1Driver
from agentcg.node.enforcement import NodePolicy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cgroup-base", type=Path, required=True)
    p.add_argument("--cgroup-root", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--node-id", required=True)
    p.add_argument("--memory", type=int, required=True)
    p.add_argument("--growth-factor", type=float, default=2.0)
    p.add_argument("--min-growth-bytes", type=int, default=32 << 20)
    p.add_argument("--broker-timeout", type=float, default=5.0)
    p.add_argument("--ready-file", type=Path)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    base: Path = args.cgroup_base

    def detect_driver(root_name: str) -> CgroupDriver:
        return CgroupV1Driver(root_name, base=base)

    setattr(node_main, "detect_driver", detect_driver)  # noqa: B010 (see module doc)
    node_main.main(
        node_main.NodeConfig(
            broker=args.broker,
            node_id=args.node_id,
            capacity_bytes=args.memory,
            cgroup_root=args.cgroup_root,
            policy=NodePolicy(
                growth_factor=args.growth_factor,
                min_growth_bytes=args.min_growth_bytes,
                broker_timeout_s=args.broker_timeout,
            ),
            ready_file=args.ready_file,
        ),
        args.log_level,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
