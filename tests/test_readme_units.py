"""The systemd units the README shows pass `systemd-analyze verify` with nothing to say (it
exits 0 even for a setting it ignores, e.g. a trailing comment taken as part of a value)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import kernel_missing

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_units() -> dict[str, str]:
    section = README.read_text().split("## Running under systemd", 1)[1]
    found = re.search(r"```ini\n(.*?)```", section, re.S)
    assert found, "no ini block in the README's systemd section"
    units: dict[str, str] = {}
    for part in found.group(1).split("# /etc/systemd/system/")[1:]:
        name, body = part.split("\n", 1)
        units[name.strip()] = body
    return units


def test_the_readme_units_verify_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        kernel_missing("no systemd-analyze to verify the README's units with")
    units = readme_units()
    assert set(units) == {"agentcg-broker.service", "agentcg-node.service"}
    agentcg = str(Path(sys.executable).parent / "agentcg")  # ExecStart must exist
    paths = []
    for name, body in units.items():
        text = "[Unit]\nDescription=agentcg\n" + body.replace(
            "/opt/agentcg/.venv/bin/agentcg", agentcg
        )
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    done = subprocess.run(
        [analyze, "verify", *paths], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""
