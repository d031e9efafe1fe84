"""The import rules in pyproject.toml hold, and they bite: a module that breaks one makes lint-imports fail.

Each case copies the four packages and pyproject.toml into a temporary folder, adds one
offending module there (never in the checkout), and runs the real ``lint-imports``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "shared", "simulations")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_copy(tmp_path: Path, offender: tuple[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    if offender is not None:
        module, source = offender
        path = tmp_path / module
        # A new module, or an existing one with the offending import added at its end.
        existing = path.read_text(encoding="utf-8") if path.exists() else ""
        path.write_text(existing + source, encoding="utf-8")
    # The copy comes first on the path, so lint-imports reads it rather than the checkout.
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [str(LINT_IMPORTS)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint_copy(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        ("client/_offender.py", "import server.scheduler\n", "client and server are peers"),
        ("server/_offender.py", "from client import device\n", "client and server are peers"),
        ("shared/_offender.py", "def late() -> None:\n    import simulations.runner\n", "shared imports neither"),
        ("shared/_offender.py", "from client.policy import DevicePolicy\n", "shared imports neither"),
        ("client/_offender.py", "import simulations.presets\n", "a device never runs simulation code"),
        ("shared/models/ncf.py", "import shared.models.factory\n", "models never import their factory"),
    ],
)
def test_a_module_breaking_a_contract_fails_lint_imports(
    tmp_path: Path, module: str, source: str, contract: str
) -> None:
    result = _lint_copy(tmp_path, (module, source))
    assert result.returncode != 0
    offender = module.removesuffix(".py").replace("/", ".")
    assert contract in result.stdout
    assert offender in result.stdout


def test_shared_holds_only_what_both_sides_use() -> None:
    """Every module under shared/ is imported, directly or not, by a device module and by a server-side one."""
    import grimp

    graph = grimp.build_graph(*PACKAGES)
    packages = {m for m in graph.modules if graph.find_children(m)}
    one_sided = []
    for module in sorted(m for m in graph.modules if m.startswith("shared.") and m not in packages):
        if module == "shared.entrypoint":
            continue  # the console command: it imports both sides, nothing imports it
        importers = graph.find_downstream_modules(module)
        device = any(m.startswith("client.") for m in importers)
        server = any(m.startswith(("server.", "simulations.")) for m in importers)
        if not (device and server):
            one_sided.append(module)
    assert one_sided == []
