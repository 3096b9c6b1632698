"""`agentcg bench failover`: how long a broker takeover keeps clients waiting.

Real broker processes on one database (broker/leadership.py): a leader, and before each
takeover a new standby (it has to log that it stands by). Then SIGKILL the leader and time,
from the kill:
- ``serving_s``: until the standby has loaded the state and serves (its ready file's mtime);
- ``client_s``: until a call made right after the kill, by a new SDK client on a target naming
  both brokers (gRPC's waitForReady, ``broker_channel_options``), has its answer.
Every takeover checks that the new leader's view is the database's: the tenant quota the old
leader set just before the kill. ``first_start_s``: the first broker, from
its start to serving (an import-warm process: the CLI's own start-up included).
"""

from __future__ import annotations

import json
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_admission import fresh_database
from .cluster import BrokerProcess

__all__ = ["bench_failover"]

MiB = 1 << 20


def bench_failover(
    *,
    takeovers: int = 3,
    database_url: str = "",
    json_path: Path | None = None,
    log: Any = None,
) -> dict[str, Any]:
    say = log or (lambda _m: None)
    from .sdk import Client

    with tempfile.TemporaryDirectory(prefix="agentcg-failover-") as tmp_name:
        tmp = Path(tmp_name)
        url_given = database_url or f"sqlite:///{tmp / 'broker.db'}"
        with fresh_database(url_given) as url:
            brokers: list[BrokerProcess] = []
            try:
                started = time.monotonic()
                leader = BrokerProcess(tmp, "b0", url)
                brokers.append(leader)
                leader.wait_ready()
                first_start_s = time.monotonic() - started
                serving: list[float] = []
                client: list[float] = []
                for i in range(1, takeovers + 1):
                    say(f"takeover {i}/{takeovers} ...")
                    standby = BrokerProcess(tmp, f"b{i}", url)
                    brokers.append(standby)
                    standby.wait_standby()
                    target = f"ipv4:{leader.address},{standby.address}"
                    with Client(leader.address) as c:
                        # The leader's last write before the kill: the new one must load it.
                        c.set_tenant("bench-failover", (64 + i) * MiB)
                    killed = time.time()
                    leader.stop(signal.SIGKILL)
                    # A client that starts at the kill (one connected to the old leader may
                    # send its call down the dead connection first: UNAVAILABLE).
                    with Client(target, timeout_s=60) as c:
                        quota = c.get_tenant("bench-failover").memory_quota_bytes
                    client.append(time.time() - killed)
                    standby.wait_ready()
                    serving.append(standby.ready.stat().st_mtime - killed)
                    if quota != (64 + i) * MiB:
                        raise RuntimeError(f"takeover {i}: quota {quota}, not {64 + i} MiB")
                    leader = standby
            finally:
                for b in brokers:
                    b.stop(signal.SIGKILL)
    result: dict[str, Any] = {
        "database": url_given.split(":", 1)[0].split("+")[0],
        "takeovers": takeovers,
        "first_start_s": round(first_start_s, 3),
        "serving_s": [round(x, 3) for x in serving],
        "serving_p50_s": round(statistics.median(serving), 3),
        "serving_max_s": round(max(serving), 3),
        "client_s": [round(x, 3) for x in client],
        "client_max_s": round(max(client), 3),
    }
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
