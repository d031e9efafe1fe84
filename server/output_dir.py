"""A run's output directory: claimed before anything is written, never emptied of what fedrec did not write.

A run refuses an output directory that already holds files, unless the config says
``overwrite = true`` (``fedrec simulate --overwrite``). Even then only fedrec's own files are
removed: the names in :data:`RUN_FILES`, and only in a directory that carries the manifest
(:data:`MANIFEST`) a fedrec run writes first. Anything else (a user's notes, a foreign file in
``devices/``) is left where it is, and a directory without a manifest is refused outright.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from shared.config import ConfigError

MANIFEST = "fedrec-run.json"

# What a run (or `fedrec audit --empirical`) writes, relative to its directory. Glob patterns;
# a trailing "/**" names a folder that fedrec creates whole (a data cache).
RUN_FILES: tuple[str, ...] = (
    MANIFEST,
    "fedrec.db",
    "fedrec.db-journal",
    "fedrec.db-wal",
    "fedrec.db-shm",
    "summary.json",
    "fedrec.log",
    "global_model.pt",
    "top-k-*.csv",
    "plots/accuracy_vs_time.png",
    "plots/epsilon_distribution.png",
    "devices/device-*.db",
    "devices/device-*.db.lock",
    "devices/device-*.db-journal",
    "devices/device-*.db-wal",
    "devices/device-*.db-shm",
    "empirical_audit.json",
    "canary-data/u.data",
    "canary-data/cache/**",
)
# Folders removed after their files, and only when nothing else is left in them.
_RUN_FOLDERS = ("plots", "devices", "canary-data/cache", "canary-data")


class OutputDirError(ConfigError):
    """The output directory cannot be used as asked (it names the directory and what to do)."""


def claim_output_dir(out: Path, *, overwrite: bool) -> None:
    """Make ``out`` this run's directory, or raise :class:`OutputDirError` having changed nothing.

    Parameters
    ----------
    out
        The configured ``output-dir``.
    overwrite
        Remove fedrec's own files from a directory an earlier fedrec run made (its manifest
        says so); every other file stays.
    """
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output-dir {out}: exists and is not a directory")
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir())
        if present:
            if not overwrite:
                shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
                raise OutputDirError(
                    f"output-dir {out}: not empty ({shown}); choose another directory, or pass --overwrite "
                    "(config overwrite=true) to replace the fedrec run there (other files are kept)"
                )
            if not (out / MANIFEST).is_file():
                raise OutputDirError(
                    f"output-dir {out}: not empty and has no {MANIFEST}, so no fedrec run made it; "
                    "nothing was removed: choose another directory"
                )
            remove_run_files(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": 1,
        "written-by": f"fedrec {_fedrec_version()}",
        "started-at": datetime.now(UTC).isoformat(timespec="seconds"),
        "owned": list(RUN_FILES),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def remove_run_files(out: Path) -> list[Path]:
    """Remove what :data:`RUN_FILES` names under ``out``; return the paths removed."""
    removed: list[Path] = []
    for pattern in RUN_FILES:
        if pattern.endswith("/**"):
            folder = out / pattern[: -len("/**")]
            if folder.is_dir() and not folder.is_symlink() and not _through_link(out, folder):
                shutil.rmtree(folder)
                removed.append(folder)
            continue
        for path in sorted(out.glob(pattern)):
            # A link is removed, never followed: what it points at is not the run's.
            if _through_link(out, path):
                continue
            if path.is_symlink() or path.is_file():
                path.unlink()
                removed.append(path)
    for name in _RUN_FOLDERS:
        folder = out / name
        if folder.is_dir() and not folder.is_symlink() and not _through_link(out, folder) and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def _through_link(out: Path, path: Path) -> bool:
    """Whether a folder between ``out`` and ``path`` is a link (the path then lies elsewhere)."""
    return any((out / parent).is_symlink() for parent in path.relative_to(out).parents if parent != Path("."))


def _fedrec_version() -> str:
    try:
        return version("fedrec")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"
