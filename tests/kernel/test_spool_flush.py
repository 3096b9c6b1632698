"""``CallSpool.flush_output`` against a real memory cgroup: the output a call wrote is charged
to the call's cgroup as page cache; a flush writes it to disk and takes it out of that cgroup,
and leaves the files as they were."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agentcg.node.cgroup import CgroupV1Driver
from agentcg.node.spawn import spawn_gated
from agentcg.node.spool import CallSpool

pytestmark = pytest.mark.kernel

MiB = 1 << 20
WRITTEN = 48 * MiB


def test_a_flush_takes_the_calls_output_out_of_its_memory(
    tmp_path: Path, driver: CgroupV1Driver
) -> None:
    spool = CallSpool(tmp_path, "lease-1")
    out, err = spool.create(capture_output=True)
    cg = driver.create("t", "s", "call")
    try:
        gated = spawn_gated(["head", "-c", str(WRITTEN), "/dev/zero"], stdout=out, stderr=err)
    finally:
        os.close(out)
        os.close(err)
    driver.attach(cg, gated.pid)
    gated.release()
    assert gated.process.wait(30) == 0
    before = driver.read_usage(cg)
    # Its output is in its memory (page cache charged to it), all of it or nearly.
    assert before >= WRITTEN * 9 // 10, before
    assert spool.output_written_and_held() == (WRITTEN, WRITTEN)

    assert spool.flush_output() == WRITTEN
    after = driver.read_usage(cg)
    assert after <= 4 * MiB, (before, after)
    # On disk as it was; reading it back charges this process, not the call. Once written out,
    # the file system may count a block of its own for the file's extents (ext4 did once in CI:
    # 48 MiB + 4 KiB), so the disk it holds is the output and at most a few such blocks.
    written, held = spool.output_written_and_held()
    assert written == WRITTEN and WRITTEN <= held <= WRITTEN + 64 * 1024, (written, held)
    data = (spool.dir / "stdout").read_bytes()
    assert len(data) == WRITTEN and data.count(0) == WRITTEN
    assert driver.read_usage(cg) <= 4 * MiB
    assert (spool.dir / "stderr").stat().st_size == 0
