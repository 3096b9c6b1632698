"""The --ready-file format: line 1 the gRPC address (the whole file when nothing else listens,
as before), then one `name host:port` line per other listener."""

from __future__ import annotations

from pathlib import Path

from agentcg.readyfile import Ready, read_ready_file, write_ready_file


def test_without_other_listeners_the_file_is_the_bare_address(tmp_path: Path) -> None:
    path = tmp_path / "broker.addr"
    write_ready_file(path, "127.0.0.1:50051")
    assert path.read_text() == "127.0.0.1:50051"
    assert read_ready_file(path) == Ready("127.0.0.1:50051", {})
    assert not path.with_suffix(".tmp").exists()


def test_other_listeners_follow_the_address(tmp_path: Path) -> None:
    path = tmp_path / "node0.addr"
    write_ready_file(path, "127.0.0.1:41000", {"metrics": "[::1]:9464"})
    assert path.read_text().splitlines() == ["127.0.0.1:41000", "metrics [::1]:9464"]
    ready = read_ready_file(path)
    assert ready.address == "127.0.0.1:41000"
    assert ready.listeners == {"metrics": "[::1]:9464"}
