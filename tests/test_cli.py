"""The fedrec command: presets, resolved config, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.cli import main


def test_config_prints_the_resolved_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--preset", "sync", "--set", "buffer-size=7"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["mode"] == "sync"
    assert resolved["buffer-size"] == 7


def test_unknown_key_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "buffer-sise=3"]) == 2
    err = capsys.readouterr().err
    assert "buffer-sise" in err and "buffer-size" in err


def test_bad_value_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--set", "noise-multiplier=-2"]) == 2
    assert "noise-multiplier" in capsys.readouterr().err


def test_unknown_preset_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--preset", "nope"]) == 2
    assert "smoke" in capsys.readouterr().err


def test_malformed_data_file_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ratings = tmp_path / "u.data"
    ratings.write_text("1\t10\t5\t881250949\n2\t20\t4\n")
    code = main(["simulate", "--backend", "local", "--set", "dataset=grouplens", "--set", f"data-path={ratings}",
                 "--set", f"cache-dir={tmp_path / 'cache'}", "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "u.data" in err and "2" in err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_presets_lists_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("default", "smoke", "no-dp", "sync", "sasrec", "large"):
        assert name in out
