"""The device code path must run on the light install (no Ray, no plotting, no audit tooling)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_modules_import_nothing_from_the_server_extras() -> None:
    code = (
        "import sys, client.app, client.cli_device, client.recommend, shared.entrypoint\n"
        "print(','.join(m for m in ('ray', 'matplotlib', 'dp_accounting') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"the device path imports {done.stdout.strip()}"


def test_base_dependencies_leave_ray_plotting_and_audit_to_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    for heavy in ("ray", "simulation", "matplotlib", "dp-accounting"):
        assert heavy not in base
    extras = project["optional-dependencies"]
    assert any("dp-accounting" in d for d in extras["server"]) and any("matplotlib" in d for d in extras["server"])
    assert any("flwr[simulation]" in d for d in extras["simulation"])
