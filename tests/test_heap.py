"""agentcg.heap: the start-up freeze moves what a process holds out of the cycle collector's
generations (a full collection no longer walks it) and leaves what comes later in them; the
metrics registry serves how many objects are frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from agentcg.heap import freeze_start_up
from agentcg.telemetry import metrics_registry


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """This test process's objects go back to the collector's generations afterwards."""
    assert gc.get_freeze_count() == 0
    try:
        yield
    finally:
        gc.unfreeze()


def _tracked(obj: object) -> bool:
    """``obj`` is in a generation a collection walks."""
    return any(o is obj for o in gc.get_objects())


def test_start_up_objects_are_frozen_and_later_ones_are_not(unfrozen: None) -> None:
    early: list[object] = []
    early.append(early)  # a container the collector tracks
    assert _tracked(early)

    frozen = freeze_start_up()

    assert frozen == gc.get_freeze_count() > 1000  # pytest's and the imports' objects too
    assert not _tracked(early)
    late: list[object] = []
    late.append(late)
    assert _tracked(late)
    assert gc.get_freeze_count() == frozen  # nothing more frozen after the call


def test_the_registry_serves_the_frozen_count(unfrozen: None) -> None:
    registry = metrics_registry()
    assert registry.get_sample_value("agentcg_gc_frozen_objects") == 0
    frozen = freeze_start_up()
    assert registry.get_sample_value("agentcg_gc_frozen_objects") == frozen
