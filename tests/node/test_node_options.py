"""`agentcg node`'s options are checked before anything starts: a bad one is a usage error
naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentcg.clients.cli import app
from typer.testing import CliRunner


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10M", "--max-output must be 0 (no limit) or at least 64.0 MiB"),
        ("-1", "--max-output must be 0 (no limit) or at least 64.0 MiB"),
        ("lots", "lots"),
    ],
)
def test_a_bad_max_output_is_a_usage_error(value: str, message: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    result = CliRunner().invoke(
        app, ["node", "--spool-dir", str(spool), "--max-output", value], terminal_width=200
    )
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert not spool.exists()  # refused before anything was made
