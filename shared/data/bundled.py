"""MovieLens-100K fetched from the ``recbole==1.2.1`` wheel on PyPI and cached.

The wheel carries ML-100K as RecBole atomic files; only those data files are
read (recbole's code is never installed as a dependency nor imported). They are
checked against pinned SHA-256 digests and cached under fedrec's cache directory,
which this module also resolves. ``docs/data.md`` says where the data comes from
and why this version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from shared.data.formats import read_recbole_atomic
from shared.data.types import DataError, InteractionLog

__all__ = [
    "BUNDLED_FILES",
    "RECBOLE_VERSION",
    "load_bundled_ml100k",
    "resolve_cache_dir",
]

RECBOLE_VERSION = "1.2.1"
_WHEEL_DIR = "recbole/dataset_example/ml-100k"
# SHA-256 of the two files inside the recbole 1.2.1 wheel. Checking them makes a
# stale or hand-edited cache detectable, so reported figures always come from the
# same data.
BUNDLED_FILES: dict[str, str] = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}


# --------------------------------------------------------------------------- cache


def resolve_cache_dir(cache_dir: str) -> Path:
    """Return the cache directory fedrec uses.

    Parameters
    ----------
    cache_dir
        The configured value; ``""`` means the environment variable
        ``FEDREC_CACHE_DIR`` when set and non-empty, else ``~/.cache/fedrec``.

    Returns
    -------
    Path
        The directory (not created here).
    """
    chosen = cache_dir or os.environ.get("FEDREC_CACHE_DIR", "") or "~/.cache/fedrec"
    return Path(chosen).expanduser()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is ordinary shared data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ bundled ML-100K


def _bundled_from_installed() -> dict[str, bytes] | None:
    """The two files from an installed recbole distribution of the pinned version."""
    try:
        dist = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != RECBOLE_VERSION:
        return None  # other versions may ship other data; keep figures comparable
    found: dict[str, bytes] = {}
    for name in BUNDLED_FILES:
        path = Path(str(dist.locate_file(f"{_WHEEL_DIR}/{name}")))
        if not path.is_file():
            return None
        found[name] = path.read_bytes()
    return found


def _bundled_from_pip() -> dict[str, bytes]:
    """Download the recbole wheel alone (never its dependencies) and read the files."""
    with tempfile.TemporaryDirectory(prefix="fedrec-recbole-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            f"recbole=={RECBOLE_VERSION}", "-d", tmp,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"could not run pip to fetch recbole=={RECBOLE_VERSION}: {exc}") from exc
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip()[-1500:]
            raise DataError(
                f"could not obtain MovieLens-100K: `{' '.join(command[2:])}` failed "
                f"(exit {done.returncode}); install the wheel with "
                f"`pip install --no-deps recbole=={RECBOLE_VERSION}` or use "
                f"dataset = 'grouplens' with data-path. pip said:\n{tail}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                return {name: wheel.read(f"{_WHEEL_DIR}/{name}") for name in BUNDLED_FILES}
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{wheels[0].name}: does not contain ML-100K ({exc})") from exc


def load_bundled_ml100k(cache_dir: Path) -> InteractionLog:
    """Load MovieLens-100K as shipped in the ``recbole==1.2.1`` wheel.

    Lookup order: (a) files already extracted to ``cache_dir/ml-100k/``; (b) an
    installed ``recbole`` 1.2.1 distribution (its data files only, recbole's code
    is never imported); (c) ``pip download --no-deps`` of the wheel into a
    temporary directory. Files obtained by (b) or (c) are written to the cache
    atomically. Each file's SHA-256 is checked, so a damaged cache is replaced.

    Parameters
    ----------
    cache_dir
        fedrec's cache directory (see :func:`resolve_cache_dir`).

    Returns
    -------
    InteractionLog
        100,000 interactions, 943 users, 1,682 items, with titles.

    Raises
    ------
    DataError
        When the data cannot be obtained or does not match the expected files.
    """
    target = Path(cache_dir) / "ml-100k"
    paths = {name: target / name for name in BUNDLED_FILES}
    cached_ok = all(
        path.is_file() and _sha256(path.read_bytes()) == BUNDLED_FILES[name] for name, path in paths.items()
    )
    if not cached_ok:
        files = _bundled_from_installed() or _bundled_from_pip()
        for name, data in files.items():
            if _sha256(data) != BUNDLED_FILES[name]:
                raise DataError(
                    f"{name} from recbole=={RECBOLE_VERSION} has an unexpected SHA-256 "
                    f"{_sha256(data)}; expected {BUNDLED_FILES[name]}"
                )
            try:
                _write_atomic(paths[name], data)
            except OSError as exc:
                raise DataError(f"cannot write the ML-100K cache {paths[name]}: {exc}") from exc
    label = f"MovieLens-100K from recbole=={RECBOLE_VERSION} (cached in {target})"
    return read_recbole_atomic(paths["ml-100k.inter"], paths["ml-100k.item"], label=label)
