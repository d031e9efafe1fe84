"""The fedrec command: presets, resolved config, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.entrypoint import attach_key_values, build_parser, main
from shared.privacy.accounting import rdp_epsilon
from shared.privacy.ledger_store import DeviceLedgerStore


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
    code = main(
        [
            "simulate",
            "--backend",
            "local",
            "--set",
            "dataset=grouplens",
            "--set",
            f"data-path={ratings}",
            "--set",
            f"cache-dir={tmp_path / 'cache'}",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "u.data" in err and "2" in err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_presets_lists_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("default", "smoke", "no-dp", "sync", "sasrec", "large"):
        assert name in out


def test_key_shaped_values_are_attached_to_key_options() -> None:
    key = "-hOZhfGbPtfOZWCUE34JrC1kZwLP05VGVqSq98jhlXM="  # the value that failed CI: base64 that starts with "-"
    argv = ["server", "register-device", "--ledger-key", key, "--replace-ledger-key"]
    assert attach_key_values(argv) == ["server", "register-device", f"--ledger-key={key}", "--replace-ledger-key"]
    # A forgotten value is left for argparse to report, not swallowed as the key.
    assert attach_key_values(["--ledger-key", "--replace-ledger-key"]) == ["--ledger-key", "--replace-ledger-key"]
    assert attach_key_values(["--public-key", "-x"]) == ["--public-key", "-x"]
    args = build_parser().parse_args(attach_key_values(
        ["server", "register-device", "--dir", "d", "--device-id", "1", "--auth-key", "k.pub", "--ledger-key", key]
    ))  # fmt: skip
    assert args.ledger_key == key


def test_audit_of_a_device_ledger_whose_key_starts_with_a_dash(tmp_path: Path) -> None:
    """One ledger key in 64 starts with "-": `--public-key KEY` (space form) must still reach the audit."""
    for attempt in range(2000):
        path = tmp_path / f"ledger-{attempt}.db"
        with DeviceLedgerStore(path, device_id=3) as ledger:
            key = ledger.identity().public_key
            if not key.startswith("-"):
                continue
            history = [(1.1, 0.05, 40)]
            ledger.append(run="r", version=0, task_id=0, unit="record", mechanism="subsampled-gaussian",
                          noise_multiplier=1.1, sample_rate=0.05, steps=40, clip_norm=1.0, accountant="rdp",
                          epsilon=rdp_epsilon(history, 1e-5), delta=1e-5, timestamp=1_700_000_000.0)  # fmt: skip
        break
    else:
        pytest.fail("no key starting with '-' in 2000 draws")
    out = tmp_path / "audit"
    assert main(["audit", "--ledger", str(path), "--public-key", key, "--output", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["findings"] == []
    # The same ledger under another key is a finding: the key given was the one checked.
    other = tmp_path / "other.db"
    with DeviceLedgerStore(other, device_id=4) as ledger:
        other_key = ledger.identity().public_key
    assert main(["audit", "--ledger", str(path), "--public-key", other_key, "--output", str(tmp_path / "o")]) == 1


@pytest.mark.parametrize("content", [b"", b"not a database" * 100])
def test_auditing_a_file_that_is_no_device_ledger_exits_2_and_leaves_it_untouched(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(content)
    assert main(["audit", "--ledger", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "not a readable device ledger" in capsys.readouterr().err
    assert path.read_bytes() == content
