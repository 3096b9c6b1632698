"""Shared test fixtures.

Kernel capabilities: a test that needs real cgroups, bcc or tracefs asks for the fixture of that
capability. When it is missing the test skips with the reason, except under
AGENTCG_REQUIRE_KERNEL=1 (set by `make test` in CI), where it fails instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agentcg.clients.pki import Pki, make_pki

REQUIRE_KERNEL = os.environ.get("AGENTCG_REQUIRE_KERNEL") == "1"


def kernel_missing(reason: str) -> None:
    """Skip (developer machine) or fail (AGENTCG_REQUIRE_KERNEL=1) for a missing capability."""
    if REQUIRE_KERNEL:
        pytest.fail(f"AGENTCG_REQUIRE_KERNEL=1 and kernel capability missing: {reason}")
    pytest.skip(f"kernel capability missing: {reason} (AGENTCG_REQUIRE_KERNEL=1 would fail)")


def _own_v1_memcg() -> Path | None:
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return None


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA with server and client certificates (the access tests)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def wait_until(predicate: Callable[[], object], what: str, *, timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="session")
def cgroup_write() -> Path:
    """The memory cgroup (v1) this process sits in, checked writable by a mkdir/rmdir."""
    base = _own_v1_memcg()
    if base is None or not base.is_dir():
        kernel_missing("no cgroup v1 memory controller for this process")
    assert base is not None
    probe = base / f"agentcg-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        kernel_missing(f"cannot create a cgroup under {base}: {e}")
    return base


@pytest.fixture(scope="session")
def tracefs() -> Path:
    path = Path("/sys/kernel/tracing")
    if not (path / "events" / "memcg").is_dir():
        kernel_missing("tracefs not mounted at /sys/kernel/tracing (make setup mounts it)")
    return path


@pytest.fixture(scope="session")
def bcc_available(tracefs: Path) -> None:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        kernel_missing(f"bcc python module not importable: {e} (make setup links it)")
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not (build / "Makefile").exists():
        kernel_missing(f"no kernel headers at {build} (make setup links them)")


@pytest.fixture(scope="session")
def loadgen() -> Path:
    """The native load generator (`make loadgen`, or $AGENTCG_LOADGEN). Missing: a skip on a
    developer machine, a failure in CI (AGENTCG_REQUIRE_KERNEL=1 or CI=true), where `make test`
    builds it."""
    from agentcg.clients.bench_admission import native_load_generator

    path = native_load_generator()
    if path is None:
        reason = "native load generator not built (make loadgen)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"in CI the native load generator is required: {reason}")
        kernel_missing(reason)  # fails under AGENTCG_REQUIRE_KERNEL=1
    assert path is not None
    return path
