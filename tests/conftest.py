"""Shared test setup."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _run_in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with a scratch working directory.

    A config that keeps the default ``output-dir`` (``runs/default``, relative) would
    otherwise write device stores and run databases into the checkout, and a run going on
    there at the same time would pick them up as its devices' history.
    """
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


REPO = Path(__file__).resolve().parents[1]
