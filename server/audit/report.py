"""Writes an :class:`~server.audit.checks.AuditReport` for people (terminal, Markdown, plots) and programs (JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from server.audit.checks import RUN, AuditReport, Finding, finite, summarize_findings


def to_json(report: AuditReport) -> dict[str, Any]:
    """The report as JSON data (what ``audit.json`` holds)."""
    return {
        "source": report.source,
        "ok": report.ok,
        # PASS, PASS (nominal), PASS (DP off) or FAIL: ok alone would call a reproducible-noise run clean.
        "verdict": report.verdict,
        "nominal": report.nominal is not None,
        "nominal-reason": report.nominal,
        "dp": {"record": report.record_dp, "user": report.user_dp},
        "notes": report.notes,
        "delta": report.delta,
        "budgets": {"record": report.record_budget, "user": report.user_budget},
        "tolerance": report.tolerance,
        "fleet": report.fleet(),
        "findings-by-kind": summarize_findings(report.findings),
        "findings": [asdict(f) for f in report.findings],
        "devices": [
            {k: (finite(v) if isinstance(v, float) else v) for k, v in asdict(d).items()} for d in report.devices
        ],
    }


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return out


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _device(f: Finding) -> str:
    return "run" if f.device_id == RUN else str(f.device_id)


def terminal_text(report: AuditReport, max_findings: int = 30) -> str:
    """A plain-text summary for the terminal: verdict, fleet table, findings."""
    fleet = report.fleet()
    lines = [
        f"fedrec privacy audit of {report.source}",
        f"verdict: {report.verdict} ({len(report.findings)} findings); "
        f"delta {report.delta:g}; claims recomputed with dp-accounting, tolerance {report.tolerance:.0%}",
        *(f"note: {n}" for n in report.notes),
        "",
    ]
    rows = []
    for unit in ("record", "user"):
        block = fleet.get(unit)
        if not isinstance(block, dict) or not block.get("devices-with-releases"):
            rows.append([unit, "0", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                unit,
                str(block["devices-with-releases"]),
                _fmt(block["epsilon-max"]),
                _fmt(block["epsilon-p50"]),
                _fmt(block["epsilon-p90"]),
                _fmt(block.get("budget", "-")),
                _fmt(block.get("budget-left-min", "-")),
                str(block.get("devices-over-budget", "-")),
            ]
        )
    lines += _table(rows, ["unit", "devices", "eps max", "eps p50", "eps p90", "budget", "left min", "over"])
    lines += ["", f"devices audited: {fleet['devices']}; updates rejected at intake: {report.rejections}"]
    if report.findings:
        lines += ["", "findings:"]
        rows = [
            [f.kind, _device(f), "-" if f.seq is None else str(f.seq), f.unit or "-", f.detail]
            for f in report.findings[:max_findings]
        ]
        lines += _table(rows, ["kind", "device", "seq", "unit", "detail"])
        if len(report.findings) > max_findings:
            lines.append(f"... and {len(report.findings) - max_findings} more (see audit.json)")
    return "\n".join(lines)


def _plots(report: AuditReport, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for unit, budget in (("record", report.record_budget), ("user", report.user_budget)):
        points = [(t, e) for t, _d, u, e in report.timeline if u == unit]
        if not points:
            continue
        t0 = points[0][0]
        # Running maximum over devices: the fleet's guarantee as time passes.
        times = np.array([t - t0 for t, _ in points])
        eps = np.maximum.accumulate(np.array([e for _, e in points]))
        ax.step(times, eps, where="post", label=f"{unit}-level: max over devices")
        if budget is not None:
            ax.axhline(budget, linestyle="--", linewidth=1, color="grey")
    ax.set_xlabel("seconds since the first release")
    ax.set_ylabel(f"cumulative epsilon (delta={report.delta:g})")
    ax.set_title("Privacy spent over time")
    ax.legend(loc="lower right")
    fig.tight_layout()
    paths.append(out / "audit_epsilon_over_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for unit in ("record", "user"):
        values = [
            d.record_recomputed if unit == "record" else d.user_recomputed
            for d in report.devices
            if (d.record_releases if unit == "record" else d.user_releases)
        ]
        if values:
            ax.hist(values, bins=30, alpha=0.6, label=f"{unit}-level ({len(values)} devices)")
    ax.set_xlabel(f"recomputed epsilon per device (delta={report.delta:g})")
    ax.set_ylabel("devices")
    ax.set_title("Distribution of device epsilon")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "audit_epsilon_distribution.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def markdown(report: AuditReport, plots: list[Path]) -> str:
    """The human-readable report (``audit.md``)."""
    fleet = report.fleet()
    lines = [
        "# fedrec privacy audit",
        "",
        f"* Source: `{report.source}`",
        f"* Verdict: **{report.verdict}** ({len(report.findings)} findings)",
        *(f"* Note: {n}" for n in report.notes),
        f"* Every device's chain verified against its registered Ed25519 key; every device's final epsilon "
        f"recomputed from its logged mechanism with dp-accounting (tolerance {report.tolerance:.0%}); "
        f"delta = {report.delta:g}.",
        *(
            [
                "* The server's own records (spending log, task log, stored config) compared with the devices' "
                "signed ledgers, and with the devices' own ledger files where the run directory holds them."
            ]
            if report.record_dp is not None  # a run, not one device's ledger
            else []
        ),
        f"* Updates rejected at intake (their ledger entries did not verify): {report.rejections}",
        "",
        "## Fleet",
        "",
        "| unit | devices | releases per device (mean / max) | eps max | p50 | p90 | p99 | budget "
        "| budget left (min) | over budget |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for unit in ("record", "user"):
        b = fleet.get(unit)
        if not isinstance(b, dict) or not b.get("devices-with-releases"):
            lines.append(f"| {unit} | 0 | – | – | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {unit} | {b['devices-with-releases']} | {b['releases-per-device-mean']:.1f} / {b['releases-max']} | "
            f"{_fmt(b['epsilon-max'])} | {_fmt(b['epsilon-p50'])} | "
            f"{_fmt(b['epsilon-p90'])} | {_fmt(b['epsilon-p99'])} | {_fmt(b.get('budget', '–'))} | "
            f"{_fmt(b.get('budget-left-min', '–'))} | {b.get('devices-over-budget', '–')} |"
        )
    lines += ["", "## Findings", ""]
    if not report.findings:
        lines.append("None.")
    else:
        lines += ["| kind | device | seq | unit | detail |", "| --- | --- | --- | --- | --- |"]
        for f in report.findings:
            seq = "" if f.seq is None else f.seq
            lines.append(f"| {f.kind} | {_device(f)} | {seq} | {f.unit or ''} | {f.detail} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += [
        "",
        "## How to read this",
        "",
        "Record-level epsilon bounds what the device's DP-SGD reveals about any one interaction; user-level "
        "epsilon bounds what the server's noised aggregates reveal about a device's whole history. See "
        "docs/privacy.md for the threat model and the limits of both.",
    ]
    return "\n".join(lines) + "\n"


def write_reports(report: AuditReport, out: Path) -> dict[str, Path]:
    """Write ``audit.json``, ``audit.md`` and the plots into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out) if report.devices else []
    json_path = out / "audit.json"
    json_path.write_text(json.dumps(to_json(report), indent=2, allow_nan=False) + "\n")
    md_path = out / "audit.md"
    md_path.write_text(markdown(report, plots))
    return {"json": json_path, "markdown": md_path, **{p.stem: p for p in plots}}
