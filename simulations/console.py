"""What a simulation prints: fedrec's own lines on the console, everything else in ``fedrec.log``.

Flower logs DEBUG lines and deprecation notices, Ray prints its actors' output and
FutureWarnings, and Opacus configures the root logger at import. By default the console
shows only fedrec's progress lines and fedrec's own warnings; every library's log record
and Python warning goes to ``fedrec.log`` in the run directory, and ``--verbose`` shows
them on the console as well.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FILE = "fedrec.log"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _FedrecOnly(logging.Filter):
    """Keep fedrec's own records (its loggers are named ``fedrec.*``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "fedrec" or record.name.startswith("fedrec.")


def configure_console(run_dir: Path, *, verbose: bool = False) -> Path:
    """Route every log record to ``run_dir/fedrec.log``; the console gets fedrec's warnings (all with ``verbose``).

    Returns the log file's path. Safe to call more than once (handlers are replaced).
    """
    from flwr.common.logger import FLOWER_LOGGER, ConsoleHandler

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOG_FILE
    root = logging.getLogger()
    for handler in list(root.handlers):
        # Opacus calls logging.basicConfig at import; an earlier call here left its own.
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(_FILE_FORMAT))
    root.addHandler(to_file)
    console = logging.StreamHandler(sys.stderr)
    if verbose:
        console.setLevel(logging.DEBUG)
        console.setFormatter(logging.Formatter(_FILE_FORMAT))
    else:
        console.setLevel(logging.WARNING)
        console.addFilter(_FedrecOnly())
        console.setFormatter(logging.Formatter("[fedrec] %(levelname)s: %(message)s"))
    root.addHandler(console)
    # Flower prints through its own console handler and also propagates to the root logger.
    for handler in FLOWER_LOGGER.handlers:
        if isinstance(handler, ConsoleHandler):
            handler.setLevel(logging.DEBUG if verbose else logging.CRITICAL + 1)
    FLOWER_LOGGER.propagate = True
    logging.captureWarnings(True)  # FutureWarning, DeprecationWarning, ...: records of "py.warnings"
    return path
