"""A call's spool (node.spool) on a real file system: output read from offsets as it grows,
bad offsets refused naming their field, the exit, the start and the enforcement actions kept
for the next agent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agentcg.errors import FailedPreconditionError, InvalidArgumentError
from agentcg.node.agent import Call
from agentcg.node.cgroup import Cgroup
from agentcg.node.spool import (
    KEEP_DELIVERED_BYTES,
    MAX_ACTION_LOG_BYTES,
    CallSpool,
    OutputTail,
    first_kept_byte,
    list_spooled,
)
from agentcg.v1 import node_pb2, types_pb2

OUT, ERR = node_pb2.Output.STREAM_STDOUT, node_pb2.Output.STREAM_STDERR


def test_output_is_read_from_offsets_as_it_grows(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path, "l1")
    out, err = spool.create(capture_output=True)
    try:
        os.write(out, b"hello ")
        os.write(err, b"oops")
        tail = OutputTail(spool, 0, 2)
        assert tail.read(64) == [(OUT, b"hello "), (ERR, b"ps")]
        assert tail.read(64) == []
        os.write(out, b"world, and more")
        assert tail.read(5) == [(OUT, b"world")]
        assert tail.read(64) == [(OUT, b", and more")]
        tail.close()
        # A caller that had 8 bytes of stdout and all of stderr goes on from there.
        again = OutputTail(spool, 8, 4)
        assert again.read(64) == [(OUT, b"rld, and more")]
        again.close()
    finally:
        os.close(out)
        os.close(err)


@pytest.mark.parametrize(
    ("offsets", "field", "message"),
    [
        ((-1, 0), "stdout_offset", "must not be negative"),
        ((0, -5), "stderr_offset", "must not be negative"),
        ((7, 0), "stdout_offset", "7 is past the 3 bytes"),
        ((0, 1), "stderr_offset", "1 is past the 0 bytes"),
    ],
)
def test_bad_offsets_are_refused_naming_the_field(
    tmp_path: Path, offsets: tuple[int, int], field: str, message: str
) -> None:
    spool = CallSpool(tmp_path, "l1")
    out, err = spool.create(capture_output=True)
    os.write(out, b"abc")
    os.close(out)
    os.close(err)
    with pytest.raises(InvalidArgumentError) as caught:
        OutputTail(spool, *offsets)
    assert caught.value.field == field and message in str(caught.value)


def test_uncaptured_output_has_nothing_to_read(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path, "l1")
    out, err = spool.create(capture_output=False)
    os.write(out, b"to /dev/null")
    os.close(out)
    os.close(err)
    assert sorted(p.name for p in spool.dir.iterdir()) == []
    tail = OutputTail(spool, 0, 0)
    assert tail.read(64) == []
    tail.close()
    with pytest.raises(InvalidArgumentError, match="stdout_offset: the call's output is not"):
        OutputTail(spool, 1, 0)


def test_exit_and_start_are_kept_for_the_next_agent(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path, "l1")
    spool.create(capture_output=False)
    assert spool.read_status() is None and spool.read_exited() is None
    assert spool.read_started() == (None, 0)
    lease = types_pb2.Lease(lease_id="l1", tenant="t", session="s", epoch=3)
    spool.write_started(lease, 4242)
    spool.status_path.write_text("137\n")
    exited = node_pb2.Exited(exit_code=137, outcome=types_pb2.OUTCOME_KILLED, peak_bytes=9)
    spool.write_exited(exited)
    again = CallSpool(tmp_path, "l1")
    assert again.read_status() == 137
    assert again.read_exited() == exited
    assert again.read_started() == (lease, 4242)
    assert list_spooled(tmp_path) == ["l1"]
    again.remove()
    assert list_spooled(tmp_path) == [] and not again.exists()


def test_a_half_written_status_is_no_status(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path, "l1")
    spool.create(capture_output=False)
    spool.status_path.write_text("")
    assert spool.read_status() is None


MiB = 1 << 20


def test_output_had_is_freed_but_for_the_last_part_and_offsets_stay(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path, "l1")
    out, err = spool.create(capture_output=True)
    # 40 MiB and a bit: what was had does not end on a block boundary.
    size = 40 * MiB + 1000
    data = b"".join(bytes([i % 251]) * 4099 for i in range(size // 4099 + 1))[:size]
    try:
        os.write(out, data)
        os.fsync(out)
        assert spool.output_bytes() >= size
        tail = OutputTail(spool, 0, 0)
        got = bytearray()
        while chunks := tail.read(MiB):
            for _, chunk in chunks:
                got.extend(chunk)
        tail.free_delivered()  # all of it had: all but the last 16 MiB (and a bit) freed
        assert got == data
        kept = spool.output_bytes()
        assert KEEP_DELIVERED_BYTES <= kept <= KEEP_DELIVERED_BYTES + MiB, kept
        fd = os.open(spool.dir / "stdout", os.O_RDONLY)
        try:
            assert first_kept_byte(fd) == 24 * MiB  # a whole MiB step, on a block boundary
            assert os.fstat(fd).st_size == size  # offsets unchanged
        finally:
            os.close(fd)
        tail.close()
        # A caller back from the kept part gets it as written (from its very first byte: the
        # hole zeroed nothing past it); from before it, it is told.
        for offset in (24 * MiB, 30 * MiB):
            again = OutputTail(spool, offset, 0)
            assert b"".join(c for _, c in again.read(64 * MiB)) == data[offset:]
            again.close()
        with pytest.raises(FailedPreconditionError) as freed:
            OutputTail(spool, 24 * MiB - 1, 0)
        assert freed.value.message.startswith("stdout_offset: bytes before 25165824 were")
        # Written on after the hole: read on from where the caller is.
        os.write(out, b"more")
        last = OutputTail(spool, size, 0)
        assert last.read(64) == [(OUT, b"more")]
        last.close()
    finally:
        os.close(out)
        os.close(err)


def test_less_than_a_step_past_the_kept_part_frees_nothing(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path, "l1")
    out, err = spool.create(capture_output=True)
    try:
        os.write(out, b"x" * (KEEP_DELIVERED_BYTES + MiB - 1))
        os.fsync(out)
        before = spool.output_bytes()
        tail = OutputTail(spool, 0, 0)
        while tail.read(MiB):
            pass
        tail.free_delivered()
        assert spool.output_bytes() == before
        tail.close()
    finally:
        os.close(out)
        os.close(err)


def test_a_half_written_lease_or_exit_is_none_not_an_error(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path, "l1")
    spool.create(capture_output=False)
    lease = types_pb2.Lease(lease_id="l1", tenant="t" * 40, session="s" * 40)
    spool.write_started(lease, 4242)
    whole = (spool.dir / "lease").read_bytes()
    (spool.dir / "lease").write_bytes(whole[: len(whole) // 2])  # an agent killed mid-write
    assert spool.read_started() == (None, 4242)
    exited = node_pb2.Exited(exit_code=1, reason="r" * 40)
    (spool.dir / "exited").write_bytes(exited.SerializeToString()[:-5])
    assert spool.read_exited() is None


def make_call() -> Call:
    return Call("l1", types_pb2.Lease(lease_id="l1"), Cgroup(("t", "s", "l1"), Path("/x")), 1, 0)


def action(seq: int) -> node_pb2.Enforcement:
    return node_pb2.Enforcement(action_id=f"a{seq}", action="hold", reason="x" * 30, seq=seq)


def test_actions_are_kept_in_order_for_the_next_agent(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path, "l1")
    spool.create(capture_output=True)
    assert spool.read_actions() == []
    for seq in range(3):
        assert spool.append_action(action(seq))
    assert CallSpool(tmp_path, "l1").read_actions() == [action(0), action(1), action(2)]
    # An agent killed in the middle of a write leaves a record cut short: the log ends there.
    log = spool.dir / "actions"
    with log.open("ab") as f:
        f.write(action(3).SerializeToString()[:4])
    assert spool.read_actions() == [action(0), action(1), action(2)]
    log.write_bytes(log.read_bytes()[:-10])
    assert spool.read_actions() == [action(0), action(1)]


def test_the_action_log_stops_at_its_size(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path, "l1")
    spool.create(capture_output=True)
    seq = 0
    while spool.append_action(action(seq)):
        seq += 1
    assert (spool.dir / "actions").stat().st_size <= MAX_ACTION_LOG_BYTES
    assert seq > 10_000  # a record is under 100 bytes
    # Full, the log stays as it is and the newest action is kept after it: an agent that reads
    # it again numbers on from there, and a caller never sees two actions with one seq.
    assert [a.seq for a in spool.read_actions()] == [*range(seq), seq]  # the one that did not fit
    for later in range(seq + 1, seq + 5):
        assert not spool.append_action(action(later))
    assert (spool.dir / "actions").stat().st_size <= MAX_ACTION_LOG_BYTES
    restored = CallSpool(tmp_path, "l1").read_actions()
    assert [a.seq for a in restored] == [*range(seq), seq + 4]
    assert restored[-1] == action(seq + 4)
    call = make_call()
    call.restore_actions(restored)
    assert call.actions_total == seq + 5
    call.add_action(action(0))
    assert call.actions[-1].seq == seq + 5
    # The newest one cut short (an agent killed while writing it): the log's end stands.
    (spool.dir / "actions.last").write_bytes(action(seq + 4).SerializeToString()[:3])
    assert [a.seq for a in CallSpool(tmp_path, "l1").read_actions()] == list(range(seq))
