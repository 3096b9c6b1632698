"""`agentcg bench access`: what TLS and the access gate cost a broker.

One real broker process per round, on a fresh SQLite database, with a simulated node
(``SimNode``), in three modes alternated round by round:
- ``open``: plaintext, no access file (the default);
- ``gate``: plaintext, an access file: every call carries a bearer token the gate checks, and
  the servicers check the tenant against the caller's scope;
- ``tls``: the same behind mutual TLS (certificates from ``clients/pki.py``).

Each round first checks that the broker refuses what its mode should refuse (a call without the
token; plaintext under TLS), then warms up, then runs ``IN_FLIGHT`` Reserve+Release pairs at a time for ``seconds``
from Python gRPC clients in this process, and reports pairs/s and the CPU the broker (and its
writer process) spent per pair. The load generator shares the machine's CPUs with the broker:
compare the modes with one another, in one run.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from agentcg.access import Role, new_token, principal_entry
from agentcg.channels import ClientSecurity
from agentcg.v1 import broker_pb2, broker_pb2_grpc, types_pb2

from .cluster import LocalCluster, tree_cpu_s
from .pki import Pki, make_pki
from .simnode import SimNode

__all__ = ["MODES", "bench_access"]

MODES = ("open", "gate", "tls")
IN_FLIGHT = 16
WARMUP_S = 2.0
TENANT = "bench-access"


async def _pairs(security: ClientSecurity, address: str, seconds: float) -> int:
    """Reserve+Release pairs done in ``seconds``, IN_FLIGHT at a time."""
    async with security.aio_channel(address) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        reserve = broker_pb2.ReserveRequest(
            tenant=TENANT, intent=types_pb2.Resources(memory_bytes=1 << 20)
        )
        end = time.monotonic() + seconds
        done = 0

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                lease = (await stub.Reserve(reserve, timeout=10)).lease
                await stub.Release(broker_pb2.ReleaseRequest(lease_id=lease.lease_id), timeout=10)
                done += 1

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return done


async def _check_gated(mode: str, client: ClientSecurity, address: str) -> None:
    """Fail unless the broker is as ``mode`` says: a call without the token is refused
    (gate, tls), and so is a plaintext connection (tls)."""
    ping = broker_pb2.PingRequest()
    expected: list[tuple[ClientSecurity, grpc.StatusCode]] = []
    if mode != "open":
        expected.append((replace(client, token=""), grpc.StatusCode.UNAUTHENTICATED))
    if mode == "tls":
        expected.append((ClientSecurity(client.token), grpc.StatusCode.UNAVAILABLE))
    for security, code in expected:
        async with security.aio_channel(address) as channel:
            try:
                await broker_pb2_grpc.BrokerStub(channel).Ping(ping, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == code:
                    continue
                raise RuntimeError(f"{mode}: {exc.code().name}, not {code.name}") from None
            raise RuntimeError(f"{mode}: the broker answered a call it should refuse ({code.name})")


def _round(mode: str, work: Path, pki: Pki, seconds: float) -> tuple[float, float]:
    """(pairs/s, broker CPU us per pair) of one round in ``mode``."""
    root, node = new_token(), new_token()
    work.mkdir(parents=True)
    flags: tuple[str, ...] = ()
    client, sim = ClientSecurity(), ClientSecurity()
    if mode != "open":
        access = work / "access.toml"
        access.write_text(
            principal_entry("bench", root, Role.ADMIN, tenants=["*"])
            + "\n"
            + principal_entry("sim-0", node, Role.NODE)
        )
        flags = ("--access", str(access))
        client, sim = ClientSecurity(token=root), ClientSecurity(token=node)
    if mode == "tls":
        flags += ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
        flags += ("--tls-client-ca", str(pki.ca))
        client = ClientSecurity(root, ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        sim = replace(client, token=node)
    with (
        LocalCluster(work, nodes=0, broker_args=flags) as cluster,
        SimNode(cluster.broker_address, security=sim),
    ):
        address = cluster.broker_address

        async def set_up() -> None:
            async with client.aio_channel(address) as channel:
                await broker_pb2_grpc.TenantAdminStub(channel).SetTenant(
                    broker_pb2.SetTenantRequest(
                        name=TENANT, quota=types_pb2.Resources(memory_bytes=1 << 40)
                    ),
                    timeout=10,
                )
            await _check_gated(mode, client, address)
            await _pairs(client, address, WARMUP_S)

        asyncio.run(set_up())
        pid = cluster.procs["broker"].pid  # with its database writer process
        cpu0, t0 = tree_cpu_s(pid), time.monotonic()
        pairs = asyncio.run(_pairs(client, address, seconds))
        elapsed, cpu = time.monotonic() - t0, tree_cpu_s(pid) - cpu0
    return pairs / elapsed, cpu / pairs * 1e6


def bench_access(
    *,
    rounds: int = 3,
    seconds: float = 8.0,
    json_path: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    cpu_us: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="agentcg-bench-access-") as tmp:
        pki = make_pki(Path(tmp) / "pki")
        for i in range(rounds):
            for mode in MODES:
                rate, us = _round(mode, Path(tmp) / f"{mode}{i}", pki, seconds)
                rates[mode].append(rate)
                cpu_us[mode].append(us)
                log(f"round {i + 1}/{rounds} {mode}: {rate:.0f} pairs/s, {us:.0f} us CPU/pair")
    result: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "in_flight": IN_FLIGHT}
    for mode in MODES:
        result[f"{mode}_pairs_per_s"] = round(statistics.median(rates[mode]))
        result[f"{mode}_cpu_us_per_pair"] = round(statistics.median(cpu_us[mode]))
        result[f"{mode}_cpu_us_per_pair_all"] = [round(x) for x in cpu_us[mode]]
    for mode in MODES[1:]:
        result[f"{mode}_cpu_ratio"] = round(
            result[f"{mode}_cpu_us_per_pair"] / result["open_cpu_us_per_pair"], 3
        )
        result[f"{mode}_rate_ratio"] = round(
            result[f"{mode}_pairs_per_s"] / result["open_pairs_per_s"], 3
        )
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
