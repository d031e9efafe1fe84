"""Results database of simulation runs and the figures drawn from it.

The store API is re-exported here. Plots live in :mod:`shared.results.plots` and are
not imported eagerly, so code that only records results does not pay for matplotlib.
"""

from shared.results.store import (
    EVAL_SPLITS,
    PRIVACY_STATUSES,
    TASK_STATUSES,
    EvalRecord,
    PrivacyRecord,
    RunInfo,
    RunStore,
    TaskRecord,
    VersionRecord,
)

__all__ = [
    "EVAL_SPLITS",
    "PRIVACY_STATUSES",
    "TASK_STATUSES",
    "EvalRecord",
    "PrivacyRecord",
    "RunInfo",
    "RunStore",
    "TaskRecord",
    "VersionRecord",
]
