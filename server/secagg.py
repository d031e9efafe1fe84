"""Secure aggregation (SecAgg+) for fedrec's synchronous mode: the server side.

In Flower 1.42 SecAgg+ exists only on the legacy API (``LegacyContext``, a
``flwr.server.strategy.Strategy``, ``FitIns``/``FitRes``), so every use of that
API on the server is kept in this module. :func:`run_secagg_round` runs exactly
one ``SecAggPlusWorkflow`` fit round over exactly the cohort it is given and
returns the mean delta; the device side is
``client/secagg_client.py``.

How the aggregate is formed
---------------------------
The server sends the *global parameters*; each device replies (inside the
protocol) with its *delta* and ``num_examples``, which fedrec sets to the same public
weight for every device (``shared.protocol.PUBLIC_WEIGHT``; a record count would be
private). Flower's client mod scales the
delta by ``rho_i = round(n_i / max_weight * Q) / Q`` (``Q`` =
``quantization_range``), clips every coordinate to ``[-clipping_range,
clipping_range]``, quantizes it stochastically to an integer in ``[0, Q]``,
prepends the integer ``rho_i * Q`` and adds the masks. The server only ever
sees masked vectors; after unmasking it learns ``sum_i rho_i * delta_i`` (up to
quantization) and ``sum_i rho_i``, and divides. That is FedAvg's
``sum n_i delta_i / sum n_i`` up to quantization error
(:func:`quantization_error_bound`).

What SecAgg+ protects
---------------------
* The server (and anyone reading the server's traffic) sees only the *sum* of
  the cohort's quantized, weighted updates: each device's vector is hidden by
  pairwise masks that cancel in the sum plus a private mask whose seed is
  Shamir-shared among its neighbours. Dropouts are tolerated while every
  surviving device keeps at least ``reconstruction_threshold`` live neighbours;
  a dropped device's pairwise masks are removed, never its own vector revealed.

What it does not protect
------------------------
* The sum itself: it is released to the server in the clear. SecAgg+ adds no
  noise; any DP guarantee still comes from the devices' DP-SGD (record level)
  or from noise on the aggregate (user level). With a cohort of two, the sum and
  one's own update give away the other's.
* Metadata: who took part, when, and who dropped out (the legacy ``FitRes``'s
  ``num_examples`` is the public weight, the same for every device, and no metrics are sent).
* A malicious server: it chooses the cohort and may add clients it controls or
  claim that honest clients dropped out (asking for their pairwise-mask key
  shares in the unmask stage), which can expose individual updates. Flower's
  SecAgg+ has no consistency checks or signatures against this; it assumes an
  honest-but-curious server.
* Mask strength: masks come from ``np.random.RandomState`` seeded with a 32-bit
  XOR fold of the shared secret (``secaggplus_utils.pseudo_rand_gen``), which is
  neither a cryptographically secure generator nor a 32-bit-plus key space; have
  it reviewed before relying on it against a capable adversary.
* Update fidelity: every coordinate of ``rho_i * delta_i`` is clipped to
  ``clipping_range`` and quantized to ``2 * clipping_range / quantization_range``;
  a device whose scaled update exceeds the range is silently clipped (the
  device logs a warning; the server cannot tell). ``num_devices *
  quantization_range`` must stay below ``modulus_range`` or the sum wraps.

Why not in asynchronous mode
----------------------------
The protocol is four blocking ``send_and_receive`` stages (setup, share keys,
collect masked vectors, unmask) over a cohort fixed at the setup stage: masks
only cancel when summed over exactly the devices that exchanged keys. FedBuff
instead folds updates into its buffer one at a time as they arrive, from
whichever devices finish, each against its own (stale) model version, and never
has a fixed set to wait for. An async-compatible design would need: (1) a
cohort per buffer fixed *before* its first update is sent (key setup ahead of
training, e.g. assigning each dispatched task to a buffer slot); (2) masks that
do not require the whole cohort to be online at one time, i.e. per-buffer
dropout recovery for devices that never finish (which, unlike a sync round, is
the common case under asynchrony), or a one-shot scheme such as
LightSecAgg/Flamingo-style aggregation; (3) staleness weights applied on the
device, since the server may no longer scale individual updates; and (4)
accounting that treats a buffer's release as one sum. None of this exists in
Flower 1.42, so fedrec offers SecAgg+ only in synchronous mode.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from shared.protocol import with_param_keys

log = logging.getLogger("fedrec.secagg")


StateDict = dict[str, torch.Tensor]


class SecAggError(RuntimeError):
    """A SecAgg+ round did not produce an aggregate (e.g. dropouts beyond the threshold)."""


@dataclass(frozen=True)
class SecAggResult:
    """The outcome of one SecAgg+ round."""

    delta: StateDict  # example-weighted mean delta, same keys/shapes/dtypes as the global params
    num_examples: int  # sum of the contributors' num_examples
    num_contributors: int
    contributors: tuple[int, ...] = ()  # node ids whose masked vectors are in the sum
    failures: int = 0  # error replies over all four stages
    failure_messages: tuple[str, ...] = field(default_factory=tuple)


class _ErrorTap(Grid):
    """Delegates to a Grid and remembers every error reply (the workflow keeps its own to itself)."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner
        self.errors: list[str] = []

    def set_run(self, run: Run) -> None:  # noqa: D102 - Grid API
        self._inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102 - Grid API
        return self._inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102 - Grid API
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid API
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102 - Grid API
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102 - Grid API
        return self._note(self._inner.pull_messages(message_ids))

    def send_and_receive(  # noqa: D102 - Grid API
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._note(self._inner.send_and_receive(messages, timeout=timeout))

    def _note(self, replies: Iterable[Message]) -> list[Message]:
        out = list(replies)
        for m in out:
            if m.has_error():
                self.errors.append(f"node {m.metadata.src_node_id}: {m.error.reason}")
        return out


class _FixedCohort(Strategy):
    """A legacy strategy that trains exactly the given cohort once and evaluates nothing.

    The SecAgg+ workflow hands ``aggregate_fit`` results whose parameters are all
    already the unmasked, weighted average; this strategy only records them.
    """

    def __init__(
        self,
        proxies: Sequence[ClientProxy],
        config: Mapping[str, Scalar],
        per_node_config: Mapping[int, Mapping[str, Scalar]],
    ) -> None:
        self._proxies = list(proxies)
        self._config = dict(config)
        self._per_node = per_node_config
        self.aggregate: Parameters | None = None
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[BaseException | tuple[ClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Unused: the caller provides the parameters."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Every node of the cohort, no sampling (the client manager is not consulted)."""
        return [
            (proxy, FitIns(parameters, {**self._config, **self._per_node.get(int(proxy.node_id), {})}))
            for proxy in self._proxies
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record the (already aggregated) parameters."""
        self.results = list(results)
        self.failures = list(failures)
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """No federated evaluation inside a SecAgg+ round."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """No federated evaluation inside a SecAgg+ round."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No centralized evaluation inside a SecAgg+ round."""
        return None


def run_secagg_round(
    grid: Grid,
    node_ids: Sequence[int],
    global_params: Mapping[str, torch.Tensor],
    round_config: Mapping[str, Scalar],
    *,
    num_shares: int,
    reconstruction_threshold: int,
    clipping_range: float,
    quantization_range: int,
    timeout: float | None,
    max_weight: float = 1000.0,
    modulus_range: int = 2**32,
    per_node_config: Mapping[int, Mapping[str, Scalar]] | None = None,
    server_round: int = 1,
) -> SecAggResult:
    """Run one SecAgg+ fit round on exactly ``node_ids`` and return the weighted mean delta.

    Each device receives ``global_params`` (as legacy Parameters, in the order of
    ``global_params``, their names added to the config by
    :func:`shared.protocol.with_param_keys`) and ``round_config`` merged with
    ``per_node_config[node_id]`` (fedrec's are built by
    :func:`shared.protocol.secagg_round_config` and
    :func:`shared.protocol.secagg_task_config`) and answers with its delta and ``num_examples``. Only the sum
    of the weighted, quantized deltas is ever unmasked; the result is
    ``sum n_i delta_i / sum n_i`` within :func:`quantization_error_bound`.

    ``max_weight`` sets the weight scale: device ``i``'s delta is multiplied by
    ``n_i / max_weight`` before clipping to ``clipping_range``, so it should be
    about the largest ``num_examples`` expected (smaller: more clipping; larger:
    coarser quantization relative to the update). ``num_shares`` and
    ``reconstruction_threshold`` follow ``SecAggPlusWorkflow`` (ints: counts,
    ``num_shares`` at most the cohort size; floats: fractions).

    Raises :class:`SecAggError` if the protocol halts (too many dropouts for the
    threshold, fewer than two devices) or no device contributed.
    """
    nodes = [int(n) for n in node_ids]
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"duplicate node ids in the SecAgg+ cohort: {nodes}")
    if len(nodes) < 2:
        raise SecAggError("SecAgg+ needs at least two devices in the cohort")
    if len(nodes) * quantization_range >= modulus_range:
        # The sum of the quantized vectors would wrap around the modulus.
        raise ValueError(
            f"{len(nodes)} devices x quantization_range {quantization_range} overflows modulus_range {modulus_range}"
        )
    keys = list(global_params)
    for k in keys:
        if not torch.is_floating_point(global_params[k]):
            raise TypeError(f"SecAgg+ aggregates floating-point parameters only; {k!r} is {global_params[k].dtype}")
    config = with_param_keys(round_config, keys)  # ProtocolError (a ValueError) if round_config sets them

    tap = _ErrorTap(grid)
    run_id = grid.run.run_id
    proxies = [GridClientProxy(nid, grid, run_id) for nid in nodes]
    strategy = _FixedCohort(proxies, config, per_node_config or {})
    base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=strategy)
    arrays = [global_params[k].detach().cpu().numpy() for k in keys]
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays), keep_input=True
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})

    workflow = SecAggPlusWorkflow(
        num_shares,
        reconstruction_threshold,
        max_weight=max_weight,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        modulus_range=modulus_range,
        timeout=timeout,
    )
    # Only the fit workflow: DefaultWorkflow would also start a client-manager
    # thread, fetch initial parameters and run evaluation rounds, none of which
    # a single fedrec round wants.
    workflow(tap, context)

    failure_messages = tuple(tap.errors)
    if strategy.aggregate is None:
        raise SecAggError(
            f"SecAgg+ round over {len(nodes)} devices produced no aggregate (protocol halted: too many "
            f"dropouts for reconstruction_threshold={reconstruction_threshold}, or no device replied); "
            f"failures: {list(failure_messages) or 'none reported'}"
        )
    mean = parameters_to_ndarrays(strategy.aggregate)
    if len(mean) != len(keys):
        raise SecAggError(f"aggregate has {len(mean)} arrays, expected {len(keys)}")
    delta: StateDict = {}
    for k, arr in zip(keys, mean, strict=True):
        ref = global_params[k]
        delta[k] = torch.from_numpy(np.asarray(arr).reshape(tuple(ref.shape))).to(dtype=ref.dtype, device=ref.device)
    contributors = tuple(sorted(int(proxy.node_id) for proxy, _ in strategy.results))
    total = sum(int(res.num_examples) for _, res in strategy.results)
    log.info("SecAgg+ round: %d of %d devices contributed (%d examples)", len(contributors), len(nodes), total)
    return SecAggResult(
        delta=delta,
        num_examples=total,
        num_contributors=len(contributors),
        contributors=contributors,
        failures=len(failure_messages),
        failure_messages=failure_messages,
    )


def quantization_error_bound(
    num_examples: Sequence[int],
    max_abs_delta: float,
    *,
    clipping_range: float,
    quantization_range: int,
    max_weight: float,
) -> float:
    """Largest per-coordinate gap between the SecAgg+ mean and ``sum n_i d_i / sum n_i``.

    Valid when no coordinate is clipped (``n_i / max_weight * |d_i| <= clipping_range``).
    With ``Q = quantization_range``, ``c = clipping_range``, ``N`` devices and
    ``rho_i = round(n_i / max_weight * Q) / Q``:

    * each device's stochastic rounding is off by less than one step ``2c/Q``;
      Flower quantizes in float32, whose rounding of ``(x + c) * Q / 2c`` adds at
      most half a step more for ``Q <= 2**23``: at most ``2 * 2c/Q`` per device,
      ``N * 4c/Q`` on the sum, divided by ``sum rho_i``;
    * weighting by ``rho_i`` instead of ``n_i`` (``|rho_i - n_i/W| <= 1/2Q``) moves
      the mean by at most ``max|d| * N / (Q * sum rho_i)``;
    * float32 rounding of the result adds a relative ``2**-23``.
    """
    n = len(num_examples)
    q = float(quantization_range)
    rho = sum(round(ne / max_weight * q) / q for ne in num_examples)
    if rho <= 0:
        raise ValueError("total weight is zero")
    return n * (4.0 * clipping_range + max_abs_delta) / (q * rho) + 2.0**-23 * max_abs_delta


__all__ = [
    "SecAggError",
    "SecAggResult",
    "quantization_error_bound",
    "run_secagg_round",
]
