"""What does fedrec's secure sum cost a device, and the server per buffer, for the default model?

The protocol is driven directly, without Flower (as ``tests/test_secure_sum_protocol.py``
does): ``client.secure_sum_device.SecureSumDevice`` and ``server.secure_sum_server.SecureSumServer``
with the real cryptography throughout (X25519, Ed25519-signed advertisements, Shamir
shares, ChaCha20 masks). The vector is the default model's shared parameters, counted
from the global state dict the server holds (``model.global_state()``, as ``server/app.py``
builds ``initial``: NCF's user embedding stays on the device), in
``shared.secure_sum.layout.VectorLayout`` order, padded to a power of two by the rotation.

1. Device cost per task, at the real length: wall ms of the secure training task
   (``client.device.Device.secure_contribution``: per-record clipped gradients, one encoding
   of their sum, the Skellam share), new session keys and ``advertise``, ``share_keys`` (the
   default degree for a cohort of 100 and of 1,000; the device hashes every advertisement
   and verifies its neighbours' signatures), ``mask`` and ``unmask``, and the bytes it sends.
   Shares reach the measured devices straight from their neighbours (the server only routes
   them). The protocol's cost (keys to unmask) is compared with one DP training task of the
   default configuration (``client.device.Device.train`` on the same MovieLens-100K user, a
   fresh privacy state per task), which the secure task replaces.
2. Server unmasking per buffer: for each size, a full session of that many devices
   (advertise, share, mask, unmask); with a dropout rate, that fraction of the cohort drops
   after sharing, so its pair masks must be removed. Timed on the server alone:
   ``unmask_request`` + every ``receive_unmask`` + ``result``; the devices' simulated work is
   timed apart. Each dropout rate of one size reuses the keys and shares of the same
   session (devices restored with ``to_state``/``from_state``, the server copied before
   round 3), so the costly round 2 runs once per size; every run masks fresh inputs and
   the result is checked against their true sum modulo ``2**bits`` (a mismatch raises).
   All sizes run at the real length by default (``--length`` shortens the vector); on a
   2-core machine sizes 50-1,000 take about 5 minutes, most of it the 1,000 devices'
   ``share_keys``.

Prints figures and ratios; asserts nothing about timings.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/secure_aggregation.py
    PYTHONPATH=. .venv/bin/python benchmarks/secure_aggregation.py --sizes 50 100 --json out/secagg.json
"""

from __future__ import annotations

import argparse
import base64
import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from _common import dump, machine
from numpy.typing import NDArray

from client.device import Device, DeviceState, TrainReply
from client.secure_sum_device import SecureSumDevice
from client.secure_training import SecureContribution
from server.secure_sum_server import SecureSumServer
from shared.config import AggregationConfig, FedrecConfig, parse_config
from shared.data.partition import load_device, prepare_partitions
from shared.models.factory import build_model
from shared.privacy.identity import DeviceIdentity
from shared.secure_sum.crypto import AEAD_NONCE_BYTES, SHARE_BYTES
from shared.secure_sum.encoding import EncodingParams, check_no_wrap, max_contributors, wrap_bound
from shared.secure_sum.layout import VectorLayout
from shared.secure_sum.release import plan_secure_release, session_shape
from shared.secure_sum.rounds import Advertisement, EncryptedShare, SessionParams, UnmaskRequest, neighbour_map

T = TypeVar("T")
ID_BYTES = 8  # a device id on the wire
GOAL_DEVICE_SHARE = 0.10  # device cost at most 10% of its DP training task
GOAL_SERVER_S_PER_100 = 1.0  # server unmasking at most 1 s per 100 contributors


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """``fn(*args)`` and its wall time in ms."""
    start = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - start)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# ------------------------------------------------------------------ the model and its training


@dataclass(frozen=True)
class TrainingFigures:
    """One DP training task of the default config on one MovieLens user."""

    device_index: int
    interactions: int
    median_ms: float
    update: NDArray[np.float32]  # the last task's delta, flattened in layout order


def default_model(cfg: FedrecConfig) -> tuple[dict[str, torch.Tensor], int]:
    """The global state the server holds (as ``server/app.py`` builds ``initial``) and the catalogue size."""
    info = prepare_partitions(cfg.data)
    model = build_model(cfg.model, info.num_items, 1, seed=cfg.seed)
    return {k: v.detach().clone() for k, v in model.global_state().items()}, info.num_items


def time_training(
    cfg: FedrecConfig, initial: dict[str, torch.Tensor], layout: VectorLayout, index: int, tasks: int
) -> TrainingFigures:
    """Median ms of ``Device.train`` (one task, fresh privacy state each time, after one warm-up)."""
    info = prepare_partitions(cfg.data)
    data = load_device(info.path, index)
    times: list[float] = []
    reply: object = None
    for task in range(tasks + 1):
        device = Device(cfg, data, info.num_items, DeviceState())
        reply, ms = _timed(device.train, initial, task)
        if not isinstance(reply, TrainReply):
            raise RuntimeError(f"the device refused its training task: {reply}")
        if task:  # the first task warms up Opacus and the allocator
            times.append(ms)
    assert isinstance(reply, TrainReply)
    flat = np.concatenate([reply.delta[name].detach().reshape(-1).numpy() for name in layout.names])
    if flat.shape != (layout.dim,):
        raise RuntimeError(f"the update has {flat.shape[0]} coordinates, the layout {layout.dim}")
    return TrainingFigures(index, len(data.train_items), _median(times), flat.astype(np.float32))


# ------------------------------------------------------------------ sessions


def new_session(
    agg: AggregationConfig, n: int, length: int, bits: int
) -> tuple[SessionParams, dict[int, DeviceIdentity], dict[int, str]]:
    """A session of ``n`` devices with the project's default degree and threshold for that roster."""
    neighbours, threshold = session_shape(agg, n)
    min_contributors = min(agg.secure_sum_min_contributors, n)
    params = SessionParams.new(range(n), length, bits, neighbours, threshold, min_contributors)
    identities = {d: DeviceIdentity.generate() for d in params.cohort}
    return params, identities, {d: i.public_key for d, i in identities.items()}


def advert_bytes(advert: Advertisement) -> int:
    """Two X25519 keys, the commitment, the raw Ed25519 signature and the device id."""
    signature = base64.urlsafe_b64decode(advert.signature + "=" * (-len(advert.signature) % 4))
    return len(advert.share_public) + len(advert.mask_public) + len(advert.seed_commitment) + len(signature) + ID_BYTES


def shares_bytes(shares: Sequence[EncryptedShare]) -> int:
    """Each share: its nonce, its ciphertext (with the AEAD tag) and sender and recipient ids."""
    return sum(len(s.nonce) + len(s.ciphertext) + 2 * ID_BYTES for s in shares)


@dataclass(frozen=True)
class DeviceFigures:
    """One device's cost in one cohort: median ms per step and bytes sent."""

    cohort: int
    neighbours: int
    threshold: int
    keys_ms: float
    advertise_ms: float
    share_keys_ms: float
    share_keys_samples: int
    mask_ms: float
    unmask_ms: float
    advert_bytes: int
    shares_bytes: int
    masked_packed_bytes: int
    masked_uint64_bytes: int
    reply_bytes: int

    @property
    def protocol_ms(self) -> float:
        return self.keys_ms + self.advertise_ms + self.share_keys_ms + self.mask_ms + self.unmask_ms

    @property
    def sent_bytes(self) -> int:
        return self.advert_bytes + self.shares_bytes + self.masked_packed_bytes + self.reply_bytes


def device_costs(agg: AggregationConfig, n: int, encoded: NDArray[np.uint64], bits: int, targets: int) -> DeviceFigures:
    """Time each round on ``targets`` devices of a cohort of ``n`` (share_keys also on their neighbours)."""
    params, identities, keys = new_session(agg, n, encoded.shape[0], bits)
    keys_ms: list[float] = []
    advertise_ms: list[float] = []
    devices: dict[int, SecureSumDevice] = {}
    roster: list[Advertisement] = []
    for d in params.cohort:
        devices[d], ms = _timed(SecureSumDevice, params, d, identities[d])
        keys_ms.append(ms)
        advert, ms = _timed(devices[d].advertise)
        advertise_ms.append(ms)
        roster.append(advert)
    # Spread the measured devices over the cohort; each needs its neighbours' shares.
    chosen = [params.cohort[i * n // targets] for i in range(targets)]
    graph = neighbour_map(params, roster)
    share_ms: list[float] = []
    sent: dict[int, list[EncryptedShare]] = {}
    for peer in dict.fromkeys(p for d in chosen for p in (d, *graph[d])):
        sent[peer], ms = _timed(devices[peer].share_keys, roster, keys)
        share_ms.append(ms)
    request = UnmaskRequest(params.digest, params.cohort, ())
    mask_ms: list[float] = []
    unmask_ms: list[float] = []
    reply_sizes: list[int] = []
    for d in chosen:
        inbox = [s for peer in graph[d] for s in sent[peer] if s.recipient == d]
        masked, ms = _timed(devices[d].mask, encoded, inbox)
        mask_ms.append(ms)
        reply, ms = _timed(devices[d].unmask, request)
        unmask_ms.append(ms)
        held = len(reply.seed_shares) + len(reply.mask_shares)
        reply_sizes.append(ID_BYTES + held * (ID_BYTES + SHARE_BYTES))
        if masked.vector.shape != encoded.shape:
            raise RuntimeError("the masked vector has the wrong length")
    one = sent[chosen[0]]
    if any(len(s.nonce) != AEAD_NONCE_BYTES for s in one):
        raise RuntimeError("a share nonce has an unexpected length")
    length = encoded.shape[0]
    return DeviceFigures(
        cohort=n,
        neighbours=params.neighbours,
        threshold=params.threshold,
        keys_ms=_median(keys_ms),
        advertise_ms=_median(advertise_ms),
        share_keys_ms=_median(share_ms),
        share_keys_samples=len(share_ms),
        mask_ms=_median(mask_ms),
        unmask_ms=_median(unmask_ms),
        advert_bytes=advert_bytes(roster[0]),
        shares_bytes=shares_bytes(one),
        masked_packed_bytes=length * math.ceil(bits / 8),
        masked_uint64_bytes=length * np.dtype(np.uint64).itemsize,
        reply_bytes=max(reply_sizes),
    )


@dataclass(frozen=True)
class ServerFigures:
    """One unmasking of one buffer."""

    cohort: int
    dropped: int
    contributors: int
    neighbours: int
    threshold: int
    length: int
    request_ms: float
    receive_ms: float
    result_ms: float
    collect_ms: float  # the server's rounds 1-3 (not part of unmasking)
    setup_devices_s: float  # the devices' advertise + share_keys, all of them (once per size)
    run_devices_s: float  # the devices' mask + unmask in this run

    @property
    def unmask_s(self) -> float:
        return (self.request_ms + self.receive_ms + self.result_ms) / 1e3

    @property
    def per_100_s(self) -> float:
        return 100.0 * self.unmask_s / self.contributors


def server_runs(
    agg: AggregationConfig, n: int, length: int, bits: int, rates: Sequence[float], seed: int
) -> list[ServerFigures]:
    """One session of ``n`` devices through round 2, then one unmasking per dropout rate."""
    params, identities, keys = new_session(agg, n, length, bits)
    server = SecureSumServer(params, keys)
    devices = {d: SecureSumDevice(params, d, identities[d]) for d in params.cohort}
    device_s = 0.0
    collect_ms = 0.0
    for device in devices.values():
        advert, ms = _timed(device.advertise)
        device_s += ms / 1e3
        _, ms = _timed(server.receive_advertisement, advert)
        collect_ms += ms
    roster, ms = _timed(server.roster)
    collect_ms += ms
    for d, device in devices.items():
        shares, ms = _timed(device.share_keys, roster, keys)
        device_s += ms / 1e3
        _, ms = _timed(server.receive_shares, d, shares)
        collect_ms += ms
    # Round 3 closes share collection: keep the state after round 2 for every dropout rate.
    saved_server = copy.deepcopy(server)
    saved_devices = {d: device.to_state() for d, device in devices.items()}
    rng = np.random.default_rng(seed)
    modulus_mask = np.uint64((1 << bits) - 1)
    out: list[ServerFigures] = []
    for rate in rates:
        server = copy.deepcopy(saved_server)
        devices = {d: SecureSumDevice.from_state(params, d, identities[d], saved_devices[d]) for d in params.cohort}
        dropped = {int(d) for d in rng.choice(np.array(params.cohort), size=round(rate * n), replace=False)}
        run_collect_ms = collect_ms
        run_device_s = 0.0
        expected = np.zeros(length, dtype=np.uint64)
        for d in params.cohort:
            if d in dropped:
                continue
            update = rng.integers(0, 1 << bits, length, dtype=np.uint64)
            expected = (expected + update) & modulus_mask
            inbox, ms = _timed(server.shares_for, d)
            run_collect_ms += ms
            masked, ms = _timed(devices[d].mask, update, inbox)
            run_device_s += ms / 1e3
            _, ms = _timed(server.receive_masked, masked)
            run_collect_ms += ms
        request, request_ms = _timed(server.unmask_request)
        replies = []
        for d in request.survivors:
            reply, ms = _timed(devices[d].unmask, request)
            run_device_s += ms / 1e3
            replies.append(reply)
        receive_ms = 0.0
        for reply in replies:
            _, ms = _timed(server.receive_unmask, reply)
            receive_ms += ms
        total, result_ms = _timed(server.result)
        if set(request.dropped) != dropped or len(request.survivors) != n - len(dropped):
            raise RuntimeError(f"n={n}: the server's request does not match the simulated dropouts")
        if not np.array_equal(total, expected):
            wrong = int(np.count_nonzero(total != expected))
            raise RuntimeError(
                f"n={n}, {len(dropped)} dropped: the secure sum differs from the true sum in {wrong} words"
            )
        out.append(
            ServerFigures(
                cohort=n,
                dropped=len(dropped),
                contributors=len(request.survivors),
                neighbours=params.neighbours,
                threshold=params.threshold,
                length=length,
                request_ms=request_ms,
                receive_ms=receive_ms,
                result_ms=result_ms,
                collect_ms=run_collect_ms,
                setup_devices_s=device_s,
                run_devices_s=run_device_s,
            )
        )
    return out


# ------------------------------------------------------------------ report


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n} B"


def print_device_table(
    figures: Sequence[DeviceFigures], encode_ms: float, training: TrainingFigures, delta_bytes: int
) -> None:
    cols = [f"cohort {f.cohort:,}" for f in figures]
    width = 16
    print(f"{'device, per task':<40}" + "".join(f"{c:>{width}}" for c in cols))
    print("-" * (40 + width * len(cols)))

    def row(label: str, values: Sequence[str]) -> None:
        print(f"{label:<40}" + "".join(f"{v:>{width}}" for v in values))

    row("degree / threshold", [f"{f.neighbours} / {f.threshold}" for f in figures])
    row("(a) secure training task ms", [f"{encode_ms:.1f}" for _ in figures])
    row("(b) session keys + advertise ms", [f"{f.keys_ms:.2f} + {f.advertise_ms:.2f}" for f in figures])
    row("(c) share_keys ms", [f"{f.share_keys_ms:.1f}" for f in figures])
    row("(d) mask ms", [f"{f.mask_ms:.1f}" for f in figures])
    row("(e) unmask ms", [f"{f.unmask_ms:.2f}" for f in figures])
    totals = [encode_ms + f.protocol_ms for f in figures]
    row("device total ms", [f"{t:.1f}" for t in totals])
    row("DP training task ms (device-side noise)", [f"{training.median_ms:.1f}" for _ in figures])
    row(
        f"protocol (b-e) / DP task (goal <= {GOAL_DEVICE_SHARE:.0%})",
        [
            f"{f.protocol_ms / training.median_ms:.1%}"
            f"{'' if f.protocol_ms <= GOAL_DEVICE_SHARE * training.median_ms else ' !'}"
            for f in figures
        ],
    )
    row("secure task / DP task", [f"{encode_ms / training.median_ms:.2f}x" for _ in figures])
    row("sent: advertisement", [_kb(f.advert_bytes) for f in figures])
    row("sent: encrypted shares", [_kb(f.shares_bytes) for f in figures])
    row("sent: masked vector, packed", [_kb(f.masked_packed_bytes) for f in figures])
    row("      (uint64 in memory)", [_kb(f.masked_uint64_bytes) for f in figures])
    row("sent: unmask reply", [_kb(f.reply_bytes) for f in figures])
    row("sent: total", [_kb(f.sent_bytes) for f in figures])
    row("total / plain float32 update", [f"{f.sent_bytes / delta_bytes:.3f}x" for f in figures])


def print_server_table(rows: Sequence[ServerFigures]) -> None:
    header = (
        f"{'contrib':>7} {'cohort':>6} {'drop':>4} {'k/t':>5} {'length':>7} {'request ms':>10} "
        f"{'receive ms':>10} {'result s':>8} {'unmask s':>8} {'s/100':>6} {'goal':>4} "
        f"{'rounds1-3 s':>11} {'dev setup s':>11} {'dev run s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ok = "ok" if r.per_100_s <= GOAL_SERVER_S_PER_100 else "MISS"
        print(
            f"{r.contributors:>7,} {r.cohort:>6,} {r.dropped:>4} {f'{r.neighbours}/{r.threshold}':>5} "
            f"{r.length:>7,} {r.request_ms:>10.2f} {r.receive_ms:>10.1f} {r.result_ms / 1e3:>8.2f} "
            f"{r.unmask_s:>8.2f} {r.per_100_s:>6.3f} {ok:>4} {r.collect_ms / 1e3:>11.2f} "
            f"{r.setup_devices_s:>11.1f} {r.run_devices_s:>9.1f}"
        )


def main() -> None:
    """Measure and print the device and server figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 500, 1000], help="buffer sizes (devices)")
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1], help="rates dropping after sharing")
    parser.add_argument("--length", type=int, default=0, help="server-run vector length (0: the real padded dim)")
    parser.add_argument("--device-cohorts", type=int, nargs="+", default=[100, 1000], help="cohorts for part 1")
    parser.add_argument("--targets", type=int, default=3, help="devices whose mask/unmask are timed per cohort")
    parser.add_argument("--repeats", type=int, default=7, help="timed noisy encodings (median taken)")
    parser.add_argument("--train-tasks", type=int, default=3, help="timed DP training tasks (median taken)")
    parser.add_argument("--device", type=int, default=12, help="MovieLens-100K device index for the training task")
    parser.add_argument("--mu-device", type=float, default=10.0, help="each device's Skellam share")
    parser.add_argument("--clip", type=float, default=1.0, help="L2 clip of the encoded update")
    parser.add_argument("--scale", type=float, default=0.0, help="encoding scale (0: secure-sum-scale's default)")
    parser.add_argument("--bits", type=int, default=0, help="modulus bits (0: secure-sum-bits' default)")
    parser.add_argument("--wrap-contributors", type=int, default=1000, help="contributors the wrap check must allow")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a phone: 1-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated inputs and dropouts")
    parser.add_argument("--json", type=str, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = parse_config({})
    agg = cfg.aggregation
    bits = args.bits or agg.secure_sum_bits
    scale = args.scale or agg.secure_sum_scale
    initial, num_items = default_model(cfg)
    layout = VectorLayout.of(initial)
    encoding = EncodingParams(dim=layout.dim, clip=args.clip, scale=scale, bits=bits)
    check_no_wrap(encoding, args.wrap_contributors, args.mu_device)  # raises WrapAroundRisk
    bound = wrap_bound(encoding, args.wrap_contributors, args.mu_device)
    length = args.length or encoding.padded_dim
    print(f"machine: {machine()}, torch threads {args.threads}")
    print(
        f"default model {cfg.model.name} ({num_items} items): {len(layout.names)} shared tensors, "
        f"dim {layout.dim:,} -> padded {encoding.padded_dim:,} words; bits {bits}, clip {args.clip:g}, "
        f"scale {scale:g}, mu_device {args.mu_device:g}"
    )
    print(
        f"wrap check at {args.wrap_contributors:,} contributors: |sum| <= {bound.signal:,.0f} + {bound.noise:,.0f} "
        f"< 2**{bits - 1}; this encoding fits {max_contributors(encoding, args.mu_device):,} contributors"
    )

    # Part 1: one device's cost per task.
    training = time_training(cfg, initial, layout, args.device, args.train_tasks)
    print(
        f"\nDP training task (client.device.Device.train, default config, MovieLens-100K device "
        f"{training.device_index} with {training.interactions} training interactions): "
        f"median {training.median_ms:.1f} ms over {args.train_tasks} tasks"
    )
    rotation_seed = SessionParams.new([0, 1], encoding.padded_dim, bits, 2, 2, 2).rotation_seed
    # The real secure task (what a device runs instead of DP training): per-record clipped gradients
    # over local-steps Poisson samples, one encoding of their sum, its Skellam share.
    secure_cfg = parse_config({"secure-aggregation": True})
    plan = plan_secure_release(secure_cfg.aggregation, secure_cfg.privacy, secure_cfg.train, layout.dim)
    info = prepare_partitions(secure_cfg.data)
    data = load_device(info.path, args.device)
    encode_times: list[float] = []
    for attempt in range(args.repeats + 1):
        device = Device(secure_cfg, data, info.num_items, DeviceState())
        contribution, ms = _timed(device.secure_contribution, initial, plan, rotation_seed)
        if not isinstance(contribution, SecureContribution):
            raise RuntimeError(f"the device refused its secure task: {contribution}")
        if attempt:  # the first warms up
            encode_times.append(ms)
    assert isinstance(contribution, SecureContribution)
    encoded = contribution.vector
    encode_ms = _median(encode_times)
    print(
        f"secure training task (Device.secure_contribution, {contribution.records_encoded} records encoded): "
        f"median {encode_ms:.1f} ms over {args.repeats} tasks"
    )
    device_figures = [device_costs(agg, n, encoded, bits, args.targets) for n in args.device_cohorts]
    print(
        f"device medians: the secure task over {args.repeats} runs; keys/advertise over the whole cohort; "
        f"share_keys over {', '.join(str(f.share_keys_samples) for f in device_figures)} devices; "
        f"mask/unmask over {args.targets} devices\n"
    )
    print_device_table(device_figures, encode_ms, training, layout.dim * 4)

    # Part 2: the server's unmasking per buffer.
    print(
        f"\nserver unmasking per buffer (length {length:,}; dropouts after sharing: "
        f"{', '.join(f'{r:.0%}' for r in args.dropouts)}; every sum checked against the true sum mod 2**{bits})"
    )
    server_rows: list[ServerFigures] = []
    started = time.perf_counter()
    for i, n in enumerate(args.sizes):
        server_rows += server_runs(agg, n, length, bits, args.dropouts, args.seed + i)
    print_server_table(server_rows)
    worst = max(server_rows, key=lambda r: r.per_100_s)
    print(
        f"worst: {worst.per_100_s:.3f} s per 100 contributors ({worst.contributors} contributors, "
        f"{worst.dropped} dropped; goal <= {GOAL_SERVER_S_PER_100:g}); "
        f"part 2 took {time.perf_counter() - started:.0f} s of simulation"
    )
    print(
        "columns: request/receive/result = unmask_request, all receive_unmask, result (server only); "
        "rounds1-3 = the server's other calls; dev setup = all devices' advertise + share_keys (shared by "
        "the dropout runs of one size); dev run = all devices' mask + unmask"
    )

    payload: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "model": cfg.model.name,
        "dim": layout.dim,
        "padded_dim": encoding.padded_dim,
        "bits": bits,
        "scale": scale,
        "mu_device": args.mu_device,
        "training_task_ms": training.median_ms,
        "secure_task_ms": encode_ms,
        "device": [
            {
                **f.__dict__,
                "protocol_ms": f.protocol_ms,
                "total_ms": encode_ms + f.protocol_ms,
                "sent_bytes": f.sent_bytes,
            }
            for f in device_figures
        ],
        "server": [{**r.__dict__, "unmask_s": r.unmask_s, "per_100_s": r.per_100_s} for r in server_rows],
    }
    dump(None if args.json is None else Path(args.json), payload)


if __name__ == "__main__":
    main()
