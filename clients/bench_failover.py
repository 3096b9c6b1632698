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

Through every takeover ``LOAD_WORKERS`` threads reserve and release 1 MiB leases on one SDK
client naming both brokers, placed on a simulated node (``SimNode``) that follows the leader.
Calls in flight at the kill fail with UNAVAILABLE and the SDK sends them again to the new
leader (a Reserve with the idempotency key the SDK gave it). After each takeover the workers
stop and the bench fails unless the new leader holds no grant for them: a Reserve sent again
that was granted twice would leave one nobody releases. It reports ``load_calls`` (answered),
``load_errors`` (calls that failed: should be 0), ``load_max_call_s`` (the longest call: the
ones that waited for the new leader) and ``load_replayed`` (Reserves the new leader answered
with the lease the old one had committed without answering).
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .bench_admission import fresh_database
from .cluster import BrokerProcess

__all__ = ["bench_failover"]

MiB = 1 << 20
LOAD_WORKERS = 8
LOAD_TENANT = "bench-failover-load"
AFTER_S = 1.0  # the load goes on this long once the new leader serves


class _Load:
    """Workers that reserve and release through a takeover, on ``client``."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls = 0
        self.errors: list[str] = []
        self.max_call_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work) for _ in range(LOAD_WORKERS)]
        for t in self._threads:
            t.start()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(...)``, counted and timed once answered."""
        t = time.monotonic()
        answer = fn(*args, **kwargs)
        took = time.monotonic() - t
        with self._lock:
            self.calls += 1
            self.max_call_s = max(self.max_call_s, took)
        return answer

    def _work(self) -> None:
        from agentcg.errors import AgentcgError

        c = self.client
        while not self._stop.is_set():
            try:
                # Queued, not denied, until the node has followed to the new leader.
                lease = self._call(c.reserve, LOAD_TENANT, MiB, queue_timeout_ms=30_000)
                self._call(c.release, lease.lease_id)
            except AgentcgError as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def bench_failover(
    *,
    takeovers: int = 3,
    database_url: str = "",
    json_path: Path | None = None,
    log: Any = None,
) -> dict[str, Any]:
    say = log or (lambda _m: None)
    from .sdk import Client
    from .simnode import SimNode

    with tempfile.TemporaryDirectory(prefix="agentcg-failover-") as tmp_name:
        tmp = Path(tmp_name)
        url_given = database_url or f"sqlite:///{tmp / 'broker.db'}"
        with fresh_database(url_given) as url, contextlib.ExitStack() as stack:
            brokers: list[BrokerProcess] = []
            try:
                started = time.monotonic()
                leader = BrokerProcess(tmp, "b0", url)
                brokers.append(leader)
                leader.wait_ready()
                first_start_s = time.monotonic() - started
                serving: list[float] = []
                client: list[float] = []
                loads: list[_Load] = []
                replayed = 0
                with Client(leader.address) as c:
                    c.set_tenant(LOAD_TENANT, 1 << 40)
                node = SimNode(leader.address, node_id="bench-failover-node")
                stack.enter_context(node)
                for i in range(1, takeovers + 1):
                    say(f"takeover {i}/{takeovers} ...")
                    standby = BrokerProcess(tmp, f"b{i}", url)
                    brokers.append(standby)
                    standby.wait_standby()
                    target = f"ipv4:{leader.address},{standby.address}"
                    node.address = target
                    with Client(leader.address) as c:
                        # The leader's last write before the kill: the new one must load it.
                        c.set_tenant("bench-failover", (64 + i) * MiB)
                    with Client(target, timeout_s=60) as loaded:
                        load = _Load(loaded)
                        loads.append(load)
                        time.sleep(AFTER_S)  # under load when the leader dies
                        killed = time.time()
                        leader.stop(signal.SIGKILL)
                        # A client that starts at the kill (one connected to the old leader
                        # may send its call down the dead connection first: UNAVAILABLE).
                        with Client(target, timeout_s=60) as c:
                            quota = c.get_tenant("bench-failover").memory_quota_bytes
                        client.append(time.time() - killed)
                        standby.wait_ready()
                        serving.append(standby.ready.stat().st_mtime - killed)
                        time.sleep(AFTER_S)
                        load.stop()
                        left = loaded.get_tenant(LOAD_TENANT).granted_memory_bytes
                    if quota != (64 + i) * MiB:
                        raise RuntimeError(f"takeover {i}: quota {quota}, not {64 + i} MiB")
                    if left and not load.errors:  # (a failed Release leaves its lease)
                        raise RuntimeError(
                            f"takeover {i}: {left} bytes still granted once every load call "
                            "released its lease: a Reserve sent again was granted twice"
                        )
                    replayed += round(
                        standby.metric(
                            "agentcg_broker_reserve_total", rpc="Reserve", outcome="replayed"
                        )
                    )
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
        "load_workers": LOAD_WORKERS,
        "load_calls": sum(x.calls for x in loads),
        "load_errors": sum(len(x.errors) for x in loads),
        "load_max_call_s": round(max(x.max_call_s for x in loads), 3),
        "load_replayed": replayed,
    }
    errors = [e for x in loads for e in x.errors]
    if errors:
        result["load_first_error"] = errors[0]
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
