"""fedrec's ServerApp: asynchronous buffered (FedBuff) or synchronous (FedAvg) training.

Thin Flower glue: parse the config once, build the initial global model from the
public catalogue size, run :class:`server.federation.Federation`, write outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from server.federation import Federation
from server.output_dir import claim_output_dir
from server.privacy_store import PrivacyStore
from server.reporting import (
    Catalogue,
    export_top_k,
    print_done,
    run_outputs,
    run_summary,
    save_global_model,
    write_plots,
    write_summary,
)
from server.run_store import RunStore
from shared.config import FedrecConfig, parse_config
from shared.data.partition import load_original_ids, load_titles, prepare_partitions
from shared.models.factory import build_model, count_parameters
from shared.secure_sum.release import check_secure_sum_config

log = logging.getLogger("fedrec.server")


def run_federation(grid: Grid, cfg: FedrecConfig, *, output_claimed: bool = False) -> dict[str, Any]:
    """Train, evaluate on every device, and write the run's output directory.

    ``output_claimed``: the caller has already run :func:`server.output_dir.claim_output_dir`
    (a simulation does, before its devices start). Returns the summary written to ``summary.json``.
    """
    out = Path(cfg.output_dir)
    # The server reads only the public catalogue size and device count; each
    # device's interactions are read by that device alone (client/app.py).
    if cfg.data.deploy_devices:
        # Real devices hold the data; the server knows only the fleet size and the catalogue.
        num_devices, num_items = cfg.data.deploy_devices, cfg.data.deploy_items
        source = f"{num_devices} deployed devices"
    else:
        info = prepare_partitions(cfg.data)
        num_devices, num_items, source = info.num_devices, info.num_items, info.source
    check_secure_sum_config(cfg, num_items)  # before anything is written
    if not output_claimed:
        claim_output_dir(out, overwrite=cfg.overwrite)
    model = build_model(cfg.model, num_items, 1, seed=cfg.seed)
    initial = {k: v.detach().clone() for k, v in model.global_state().items()}
    db_path = out / "fedrec.db"
    store = RunStore(f"sqlite:///{db_path}")
    privacy_store = PrivacyStore(f"sqlite:///{db_path}")
    try:
        fed = Federation(
            grid,
            cfg,
            num_devices,
            num_items,
            initial,
            store,
            run_name=out.name,
            privacy_store=privacy_store,
        )
        fed.driver.discover(num_devices, timeout=300.0)
        if cfg.privacy.device_keys == "registered":
            # Keys registered by `fedrec server register-device` (revoked ones are not returned).
            with PrivacyStore(_database_url(cfg.privacy.key_registry)) as registry:
                for device, key in registry.keys().items():
                    privacy_store.register_key(device, key)
        for device in range(num_devices):
            fed.intake.register(device, fed.driver.public_keys.get(device))
        print(
            f"[fedrec] {num_devices} devices, {num_items} items ({source}); "
            f"model {cfg.model.name} with {count_parameters(model):,} parameters; "
            f"mode {cfg.aggregation.mode}, DP {'on' if cfg.privacy.dp else 'off'}",
            flush=True,
        )
        fed.train()
        fed.driver.drain()
        model_path = save_global_model(out, fed.scheduler.version, fed.scheduler.params)
        final = fed.evaluate(list(range(num_devices)), "test", export=cfg.eval.export_top_k != "none")
        fed.driver.drain()
        fed.spending.reconcile()
        fed.driver.drain()
        catalogue = None
        if not cfg.data.deploy_devices:
            users, items = load_original_ids(info.path)
            catalogue = Catalogue(users, items, load_titles(info.path))
        export = export_top_k(out, final.top_lists, cfg.eval.export_top_k, "test", catalogue)
        plots = write_plots(
            out,
            fed.evaluations,
            sorted(fed.spending.device_epsilon.values()),
            cfg.privacy.epsilon_budget if cfg.privacy.dp else None,
            cfg.privacy.delta,
        )
        summary = run_summary(
            cfg,
            final.record,
            fed.scheduler,
            fed.spending,
            fed.status_counts,
            contributors=len(fed.contributors),
            num_devices=num_devices,
            wall_seconds=fed.wall(),
            extra={
                "dataset": source,
                "model-parameters": count_parameters(model),
                "outputs": run_outputs(db_path, model_path, export, plots),
            },
        )
        store.finish_run(fed.run_id, summary)
        write_summary(out, summary)
    finally:
        store.close()
        privacy_store.close()
    print_done(summary, out)
    return summary


def _database_url(value: str) -> str:
    """A SQLAlchemy URL, or a path to a SQLite file turned into one."""
    return value if "://" in value else f"sqlite:///{Path(value).expanduser().resolve()}"


def build_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is the defaults, then ``context.run_config``, then ``overrides``."""
    fixed = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = parse_config({**dict(context.run_config), **fixed})
        if isinstance(grid, InMemoryGrid):
            # `flwr run .` on a local simulation federation. Flower starts its message extractor
            # after its backend (Ray) is up, seconds after this app starts, so this normally takes
            # effect; if the extractor were already running, Flower's own (slower) loop stays.
            from simulations import message_scan

            message_scan.install()
        run_federation(grid, cfg)

    return app


app = build_server_app()
