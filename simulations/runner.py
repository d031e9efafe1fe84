"""Runs a fedrec simulation in-process on Flower's simulation runtime (Ray).

``flwr run .`` runs the same ServerApp and ClientApp through a SuperLink; this
runner is the quick path for ``fedrec simulate``: it prepares the device
partitions, then starts Flower with one virtual SuperNode per device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from server.output_dir import claim_output_dir
from server.stop import RunInterrupted, clear_stop, request_stop, stop_requested
from shared.config import FedrecConfig, parse_config, to_flat
from shared.data.partition import history_lengths, prepare_partitions
from shared.secure_sum.release import check_secure_sum_config

log = logging.getLogger("fedrec.simulate")


def _cpus_per_actor(cpus: int, num_actors: int) -> float:
    """Ray CPUs to reserve per actor so that Flower's pool holds exactly ``num_actors``.

    More actors than cores is allowed (fractional CPUs): a task's message round trip leaves an actor
    idle for a moment, which a third actor on two cores fills. Rounded down to 1/1000 so that
    Flower's ``int(cpus / per_actor)`` cannot come out one short through float error.
    """
    if num_actors < 1:
        raise ValueError(f"need at least one actor, got {num_actors}")
    return math.floor(1000 * cpus / num_actors) / 1000


# Peak RSS of one ClientApp actor on the default run is about 0.6 GB; keep 1 GiB each, and 2 GiB for
# the server process and Ray itself.
_GIB_PER_ACTOR = 1.0
_GIB_RESERVED = 2.0


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return None


def default_actors(cpus: int | None = None, memory_gib: float | None = None) -> int:
    """One more Ray actor than CPU cores, as far as memory allows (1 GiB per actor).

    Between two tasks an actor waits for Flower to hand it the next message; a spare actor keeps the
    cores busy meanwhile (default run on 2 cores: 3 actors took 13% less wall time than 2). On a
    many-core machine with little memory per core, memory decides.
    """
    cores = cpus if cpus is not None else (os.cpu_count() or 1)
    memory = memory_gib if memory_gib is not None else _memory_gib()
    actors = cores + 1
    if memory is not None:
        actors = min(actors, int((memory - _GIB_RESERVED) // _GIB_PER_ACTOR))
    return max(1, actors)


# What a simulation runs under unless told otherwise (the Flower app defaults suit deployment).
SIMULATION_DEFAULTS: Mapping[str, Any] = {"reproducible-noise": True, "evaluation": "exact"}


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def quartile_bounds(lengths: np.ndarray) -> tuple[int, ...]:
    """Activity-tier bounds at the 25th and 75th percentiles of history length (fewer if they coincide)."""
    if len(lengths) == 0:
        return ()
    bounds = sorted({max(1, int(np.ceil(np.quantile(lengths, q)))) for q in (0.25, 0.75)})
    # A bound at or below the shortest history would leave the bottom tier empty.
    return tuple(b for b in bounds if b > int(lengths.min()))


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[None]:
    """Ctrl-C asks the server's loops to stop (``server/stop.py``); a second one exits at once.

    The loops notice within one poll, unwind through the stores (flushing what was
    recorded) and raise :class:`RunInterrupted`, which the command turns into one line.
    Only in the main thread (a signal handler cannot be set elsewhere).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if stop_requested():
            os._exit(130)  # the second Ctrl-C: the user does not want to wait
        request_stop()
        print("\n[fedrec] stopping (Ctrl-C again to quit at once) ...", file=sys.stderr, flush=True)

    clear_stop()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        clear_stop()


def simulate(
    overrides: Mapping[str, Any],
    num_actors: int | None = None,
    backend: str = "ray",
    *,
    console: str | None = None,
) -> dict[str, Any]:
    """Run one simulation and return its summary (also written to ``output-dir``).

    Parameters
    ----------
    overrides
        Flat config keys over the defaults (a preset merged with ``--set`` values).
    num_actors
        Ray actors running ClientApps in parallel (each gets ``cpus / num_actors`` CPUs); None:
        :func:`default_actors`.
    backend
        ``"ray"``: Flower's simulation runtime. ``"local"``: :class:`LocalGrid`, the same
        ServerApp and ClientApp code in this process (same numbers, no Ray start-up).
    console
        ``None`` (library use): logging is left as the caller set it. ``"quiet"`` (the
        ``fedrec simulate`` command) or ``"verbose"``: every log record goes to ``fedrec.log``
        in the run directory, and the console shows fedrec's own lines (``"verbose"``: all).
    """
    if backend not in ("ray", "local"):
        raise ValueError(f"backend must be 'ray' or 'local', got {backend!r}")
    # A simulation is reproducible unless asked otherwise: same seed, same numbers (the run is
    # labelled nominal). Its evaluation is exact, per device, with the top-10 export, for
    # research (labelled "simulation only, not private"). Deployed devices keep the defaults:
    # noise from OS entropy, private evaluation.
    merged = {**SIMULATION_DEFAULTS, **overrides}
    fedrec_secure = merged.get("secure-aggregation-protocol", "fedrec") == "fedrec"
    if _truthy(merged.get("secure-aggregation")) and fedrec_secure and "reproducible-noise" not in overrides:
        # fedrec's secure sum draws keys and noise from the OS only: no nominal mode for it.
        merged["reproducible-noise"] = False
    if merged["evaluation"] == "exact":
        merged.setdefault("export-top-k", "csv")
    cfg: FedrecConfig = parse_config(merged)
    # Quiet Flower's telemetry and update check before it is imported.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    info = prepare_partitions(cfg.data)  # before any device starts, so none races to build it
    check_secure_sum_config(cfg, info.num_items)
    # Refuse a directory holding files before anything starts (and before any device writes there).
    claim_output_dir(Path(cfg.output_dir), overwrite=cfg.overwrite)
    if console is not None:
        from simulations.console import configure_console

        configure_console(Path(cfg.output_dir), verbose=console == "verbose")
    if "activity-tiers" not in overrides:
        # Tier bounds at the data's quartiles, so metrics show the bottom and top quartiles.
        cfg = replace(cfg, eval=replace(cfg.eval, activity_tiers=quartile_bounds(history_lengths(info))))
    flat = to_flat(cfg)

    from client.app import build_client_app
    from server.app import run_federation

    with _stop_on_interrupt():
        if backend == "local":
            from simulations.local_grid import LocalGrid

            return run_federation(LocalGrid(build_client_app(flat), info.num_devices), cfg, output_claimed=True)
        return _run_on_ray(cfg, flat, info.num_devices, num_actors, actor_output=console != "quiet")


def _run_on_ray(
    cfg: FedrecConfig, flat: Mapping[str, Any], num_devices: int, num_actors: int | None, *, actor_output: bool
) -> dict[str, Any]:
    """Flower's simulation engine: the ServerApp in its thread, ClientApps on Ray actors.

    ``actor_output``: stream the actors' own output to this console (Ray's ``log_to_driver``);
    otherwise it stays in Ray's session logs.
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import run_federation

    result: dict[str, Any] = {}
    interrupted: list[RunInterrupted] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            result.update(run_federation(grid, cfg, output_claimed=True))
        except RunInterrupted as exc:
            interrupted.append(exc)  # Flower then shuts its actors down as after any run

    cpus = max(1, os.cpu_count() or 1)
    if num_actors is None:
        num_actors = default_actors(cpus)
    backend_config = {
        "client_resources": {"num_cpus": _cpus_per_actor(cpus, num_actors), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "logging_level": "error", "log_to_driver": actor_output},
    }
    from simulations import message_scan

    # Flower's stock scan would keep a core busy walking all devices ten times a second.
    message_scan.install()
    # The server's share of a simulation is light (checking and folding in updates); the cores
    # belong to the Ray actors that train. A second intra-op thread here only spins (OpenMP
    # busy-waits after each parallel op), measured at about a fifth of a core taken from them.
    import torch

    torch.set_num_threads(1)
    started = time.monotonic()
    run_simulation(
        server_app=server_app,
        client_app=build_client_app(flat),
        num_supernodes=num_devices,
        backend_config=backend_config,  # type: ignore[arg-type]
    )
    if interrupted:
        raise interrupted[0]
    if not result:
        raise RuntimeError("the simulation ended without a result; see the log above")
    log.info("simulation finished in %.1f s", time.monotonic() - started)
    return result
