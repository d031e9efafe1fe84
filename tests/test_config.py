"""Configuration: one source of defaults, validated once, errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shared.config import ConfigError, default_flat_config, parse_config, to_flat

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_equals_the_dataclass_defaults() -> None:
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == default_flat_config()


def test_every_key_has_one_meaning_shown_by_help_and_in_pyproject(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    from shared.entrypoint import main
    from simulations.config_help import KEY_HELP

    defaults = default_flat_config()
    assert list(KEY_HELP) == list(defaults)
    assert all(text.strip() for text in KEY_HELP.values())
    section = (ROOT / "pyproject.toml").read_text().split("[tool.flwr.app.config]")[1].split("\n[")[0]
    comments = {}
    for line in section.splitlines():
        match = re.match(r"^([a-z0-9-]+)\s*=\s*.*?\s+#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    assert comments == KEY_HELP
    for command in ("config", "simulate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        for key, default in defaults.items():
            assert re.search(rf"^  {re.escape(key)}\s+= {re.escape(repr(default))}", shown, re.M), (command, key)


def test_overrides_are_typed_from_strings() -> None:
    cfg = parse_config(
        {
            "mode": "sync",
            "buffer-size": "20",
            "dp": "false",
            "evaluation": "exact",
            "delta": "1e-6",
            "mlp-layers": "128,64",
            "concurrency": 30,
        }
    )
    assert cfg.aggregation.mode == "sync"
    assert cfg.aggregation.buffer_size == 20
    assert cfg.privacy.dp is False
    assert cfg.privacy.delta == pytest.approx(1e-6)
    assert cfg.model.mlp_layers == (128, 64)


def test_round_trip_through_flat_keys() -> None:
    cfg = parse_config({"model": "sasrec", "learning-rate": 0.05, "mlp-layers": ""})
    assert parse_config(to_flat(cfg)) == cfg


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"buffer-sise": 3}, "buffer-size"),  # typo: suggestion names the real key
        ({"noise-multiplier": -1.0}, "noise-multiplier"),
        ({"delta": 1.5}, "delta"),
        ({"mode": "semi-sync"}, "mode"),
        ({"local-steps": "ten"}, "local-steps"),
        ({"local-steps": 2.5}, "local-steps"),
        ({"dp": "maybe"}, "dp"),
        ({"buffer-size": 60, "concurrency": 50}, "buffer-size"),
        ({"embedding-dim": 30, "num-heads": 4}, "num-heads"),
        ({"dataset": "grouplens"}, "data-path"),
        ({"epsilon-budget": float("inf")}, "epsilon-budget"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_values_fail_naming_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(overrides)
    assert key in str(err.value)


def test_config_objects_are_frozen() -> None:
    cfg = parse_config({})
    with pytest.raises(AttributeError):
        cfg.privacy.dp = False  # type: ignore[misc]


def test_ghost_clipping_for_sasrec_is_refused_at_parse_time() -> None:
    with pytest.raises(ConfigError, match="clipping-mode"):
        parse_config({"model": "sasrec", "clipping-mode": "ghost"})
    assert parse_config({"model": "sasrec", "clipping-mode": "auto"}).privacy.clipping_mode == "auto"
