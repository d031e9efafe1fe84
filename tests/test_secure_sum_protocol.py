"""The secure sum's two halves, driven directly (no Flower): exact cancellation, dropouts,
the threshold, forged and replayed messages, key lengths, and what a masked vector reveals."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pytest

import shared.secure_sum.crypto as crypto
from client.secure_sum_device import SecureSumDevice, fresh_generator
from server.secure_sum_server import SecureSumServer
from shared.config import ConfigError, parse_config
from shared.privacy.accounting import BudgetExhausted, DeviceAccountant
from shared.privacy.identity import DeviceIdentity
from shared.secure_sum.encoding import EncodingParams, add_mod, decode_sum, encode_sum, skellam_noise, to_modular
from shared.secure_sum.release import plan_secure_release
from shared.secure_sum.rounds import (
    Advertisement,
    EncryptedShare,
    SecureSumError,
    SecureSumWithheld,
    SessionParams,
    UnmaskRequest,
    component_size,
    default_neighbours,
    default_threshold,
    neighbour_map,
)

BITS = 20
LENGTH = 64


def _session(
    n: int, neighbours: int = 4, threshold: int | None = None, min_contributors: int = 3, length: int = LENGTH
) -> tuple[SessionParams, dict[int, DeviceIdentity]]:
    ids = list(range(10, 10 + n))
    params = SessionParams.new(
        ids, length, BITS, neighbours, threshold or default_threshold(neighbours), min_contributors
    )
    return params, {d: DeviceIdentity.generate() for d in ids}


def _inputs(params: SessionParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, 1 << params.bits, params.length, dtype=np.uint64) for d in params.cohort}


def _run(
    params: SessionParams,
    identities: dict[int, DeviceIdentity],
    inputs: dict[int, np.ndarray],
    drop_after_shares: Sequence[int] = (),
    drop_before_unmask: Sequence[int] = (),
    exclude: Sequence[int] = (),
) -> tuple[SecureSumServer, np.ndarray]:
    keys = {d: identity.public_key for d, identity in identities.items()}
    server = SecureSumServer(params, keys)
    devices = {d: SecureSumDevice(params, d, identities[d]) for d in params.cohort}
    for device in devices.values():
        server.receive_advertisement(device.advertise())
    roster = server.roster()
    for d, device in devices.items():
        server.receive_shares(d, device.share_keys(roster, keys))
    alive = [d for d in devices if d not in drop_after_shares]
    for d in alive:
        server.receive_masked(devices[d].mask(inputs[d], server.shares_for(d)))
    for d in exclude:
        server.exclude(d, "its ledger failed verification")
    request = server.unmask_request()
    for d in request.survivors:
        if d not in drop_before_unmask:
            server.receive_unmask(devices[d].unmask(request))
    return server, server.result()


def _expected(inputs: dict[int, np.ndarray], members: Sequence[int], bits: int) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for d in members:
        total = (total + inputs[d]) & np.uint64((1 << bits) - 1)
    return total


@pytest.mark.parametrize(("n", "neighbours"), [(3, 2), (5, 4), (12, 4), (20, 6)])
def test_masks_cancel_exactly(n: int, neighbours: int) -> None:
    params, identities = _session(n, neighbours)
    inputs = _inputs(params)
    server, total = _run(params, identities, inputs)
    assert server.contributors == params.cohort
    np.testing.assert_array_equal(total, _expected(inputs, params.cohort, BITS))


def test_a_masked_vector_is_not_its_input() -> None:
    params, identities = _session(5)
    inputs = _inputs(params)
    keys = {d: i.public_key for d, i in identities.items()}
    server = SecureSumServer(params, keys)
    devices = {d: SecureSumDevice(params, d, identities[d]) for d in params.cohort}
    for device in devices.values():
        server.receive_advertisement(device.advertise())
    roster = server.roster()
    for d, device in devices.items():
        server.receive_shares(d, device.share_keys(roster, keys))
    first = params.cohort[0]
    masked = devices[first].mask(inputs[first], server.shares_for(first)).vector
    # Equal words would happen by chance with probability 2**-20 per coordinate.
    assert int(np.count_nonzero(masked == inputs[first])) <= 2


def test_dropouts_up_to_the_threshold_recover_the_survivors_sum() -> None:
    # 12 devices on a ring of degree 6 (threshold 4): two dropouts leave every device at least
    # 4 surviving neighbours; one more survivor goes quiet at unmasking.
    params, identities = _session(12, neighbours=6)
    inputs = _inputs(params, seed=1)
    graph_owner = params.cohort
    dropped = [graph_owner[0], graph_owner[5]]
    server, total = _run(params, identities, inputs, drop_after_shares=dropped)
    survivors = [d for d in params.cohort if d not in dropped]
    assert server.contributors == tuple(survivors)
    np.testing.assert_array_equal(total, _expected(inputs, survivors, BITS))


def test_a_cohort_of_four_survives_one_dropout() -> None:
    # The shape a small deployment gets: a complete graph of 4 (degree 3), threshold 2 of 3.
    from shared.config import parse_config
    from shared.secure_sum.release import session_shape

    neighbours, threshold = session_shape(parse_config({}).aggregation, 4, 4)
    assert (neighbours, threshold) == (4, 2)
    params, identities = _session(4, neighbours=neighbours, threshold=threshold, min_contributors=3)
    inputs = _inputs(params, seed=4)
    dropped = [params.cohort[1]]
    server, total = _run(params, identities, inputs, drop_after_shares=dropped)
    survivors = [d for d in params.cohort if d not in dropped]
    assert server.contributors == tuple(survivors)
    np.testing.assert_array_equal(total, _expected(inputs, survivors, BITS))
    # Two dropouts leave each survivor's seed with one holder: below the threshold and the minimum.
    params, identities = _session(4, neighbours=neighbours, threshold=threshold, min_contributors=3)
    with pytest.raises(SecureSumWithheld):
        _run(params, identities, _inputs(params), drop_after_shares=list(params.cohort[:2]))


def test_one_share_fewer_than_the_threshold_unmasks_nothing() -> None:
    # Complete graph of 5 (degree 4, threshold 3): each survivor's seed is held by the 4 others.
    params, identities = _session(5, neighbours=4, threshold=3)
    inputs = _inputs(params, seed=2)
    # With 3 of the 4 holders of each seed replying, the sum is recovered ...
    _, total = _run(params, identities, inputs, drop_before_unmask=[params.cohort[0]])
    np.testing.assert_array_equal(total, _expected(inputs, params.cohort, BITS))
    # ... with only 2 replying (one fewer than the threshold), nothing is unmasked.
    params, identities = _session(5, neighbours=4, threshold=3)
    with pytest.raises(SecureSumWithheld, match="shares of device"):
        _run(params, identities, _inputs(params), drop_before_unmask=list(params.cohort[:3]))


def test_fewer_survivors_than_the_minimum_are_withheld() -> None:
    params, identities = _session(5, neighbours=4, min_contributors=4)
    with pytest.raises(SecureSumWithheld, match="fewer than min_contributors 4"):
        _run(params, identities, _inputs(params), drop_after_shares=list(params.cohort[:2]))


def test_an_excluded_device_leaves_the_sum_and_the_minimum_still_holds() -> None:
    params, identities = _session(6, neighbours=4, min_contributors=4)
    inputs = _inputs(params, seed=3)
    bad = params.cohort[2]
    server, total = _run(params, identities, inputs, exclude=[bad])
    assert bad not in server.contributors and server.excluded == {bad: "its ledger failed verification"}
    np.testing.assert_array_equal(total, _expected(inputs, [d for d in params.cohort if d != bad], BITS))
    # A ledger failure that takes the sum below the minimum withholds the whole cohort.
    params, identities = _session(4, neighbours=2, min_contributors=4)
    with pytest.raises(SecureSumWithheld):
        _run(params, identities, _inputs(params), exclude=[params.cohort[0]])


def _advertised(n: int = 4) -> tuple[SessionParams, dict, dict, dict, SecureSumServer]:
    params, identities = _session(n, neighbours=2, min_contributors=2)
    keys = {d: i.public_key for d, i in identities.items()}
    devices = {d: SecureSumDevice(params, d, identities[d]) for d in params.cohort}
    return params, identities, keys, devices, SecureSumServer(params, keys)


def test_a_forged_advertisement_is_rejected_by_server_and_devices() -> None:
    params, identities, keys, devices, server = _advertised()
    a, b = params.cohort[:2]
    honest = devices[a].advertise()
    # The server (or anyone) substitutes its own key in a's name: the signature no longer holds.
    forged = dataclasses.replace(honest, mask_public=crypto.x25519_public_bytes(crypto.new_x25519()))
    with pytest.raises(SecureSumError, match="not signed by its ledger key"):
        server.receive_advertisement(forged)
    # Signed by another device's key.
    impostor = dataclasses.replace(honest, signature=identities[b].sign(honest.signed_bytes()))
    with pytest.raises(SecureSumError, match="not signed by its ledger key"):
        server.receive_advertisement(impostor)
    # A device checks its neighbours' advertisements itself: a server cannot stand between two devices.
    roster = [forged] + [devices[d].advertise() for d in params.cohort[1:]]
    neighbour = neighbour_map(params, roster)[a][0]
    with pytest.raises(SecureSumError, match=f"device {a}'s advertisement is not signed"):
        devices[neighbour].share_keys(roster, keys)


def test_a_replayed_advertisement_is_rejected() -> None:
    params, identities, keys, devices, server = _advertised()
    old = devices[params.cohort[0]].advertise()
    # The same device in a new session: its old, validly signed advertisement is refused.
    new_params = SessionParams.new(
        params.cohort, params.length, params.bits, params.neighbours, params.threshold, params.min_contributors
    )
    new_server = SecureSumServer(new_params, keys)
    with pytest.raises(SecureSumError, match="another session"):
        new_server.receive_advertisement(old)
    server.receive_advertisement(old)
    with pytest.raises(SecureSumError, match="advertised twice"):
        server.receive_advertisement(old)


def _through_shares(n: int = 5) -> tuple[SessionParams, dict, SecureSumServer, dict]:
    params, identities = _session(n, neighbours=4, threshold=3)
    keys = {d: i.public_key for d, i in identities.items()}
    server = SecureSumServer(params, keys)
    devices = {d: SecureSumDevice(params, d, identities[d]) for d in params.cohort}
    for device in devices.values():
        server.receive_advertisement(device.advertise())
    roster = server.roster()
    for d, device in devices.items():
        server.receive_shares(d, device.share_keys(roster, keys))
    return params, devices, server, _inputs(params)


def test_a_forged_or_replayed_share_is_rejected() -> None:
    params, devices, server, inputs = _through_shares()
    a = params.cohort[0]
    shares = server.shares_for(a)
    # Tampered ciphertext.
    tampered = [
        dataclasses.replace(shares[0], ciphertext=bytes([shares[0].ciphertext[0] ^ 1]) + shares[0].ciphertext[1:])
    ]
    with pytest.raises(SecureSumError, match="failed authentication"):
        devices[a].mask(inputs[a], tampered + shares[1:])
    # A share for another device redirected to this one.
    b = params.cohort[1]
    redirected = [dataclasses.replace(s, recipient=a) for s in server.shares_for(b) if s.sender != a][:1]
    with pytest.raises(SecureSumError, match="failed authentication"):
        devices[a].mask(inputs[a], redirected + [s for s in shares if s.sender != redirected[0].sender])
    # A share replayed from an earlier session of the same devices.
    old_params, old_devices, old_server, _ = _through_shares()
    replay = old_server.shares_for(old_params.cohort[0])
    with pytest.raises(SecureSumError):
        devices[a].mask(inputs[a], replay)
    # Sent twice.
    with pytest.raises(SecureSumError, match="two shares"):
        devices[a].mask(inputs[a], shares + shares[:1])


def test_a_device_unmasks_once_and_refuses_unsafe_requests() -> None:
    params, devices, server, inputs = _through_shares()
    for d, device in devices.items():
        server.receive_masked(device.mask(inputs[d], server.shares_for(d)))
    a, b = params.cohort[:2]
    everyone = params.cohort
    # The same device named survivor and dropout: the server would get both of its seeds.
    with pytest.raises(SecureSumError, match="survivors and as dropped"):
        devices[a].unmask(UnmaskRequest(params.digest, everyone, (b,)))
    # The first request was refused, and there is no second chance.
    with pytest.raises(SecureSumError, match="cannot unmask now"):
        devices[a].unmask(UnmaskRequest(params.digest, everyone, ()))
    # Too few survivors for the minimum.
    with pytest.raises(SecureSumError, match="fewer than min_contributors"):
        devices[b].unmask(UnmaskRequest(params.digest, (b, params.cohort[2]), tuple(params.cohort[3:]) + (a,)))


def test_a_device_refuses_to_unmask_a_small_component() -> None:
    # A ring of 8 with degree 2: dropping two opposite devices splits the survivors in two parts of 3.
    params, identities = _session(8, neighbours=2, threshold=2, min_contributors=4)
    keys = {d: i.public_key for d, i in identities.items()}
    devices = {d: SecureSumDevice(params, d, identities[d]) for d in params.cohort}
    adverts = [device.advertise() for device in devices.values()]
    graph = neighbour_map(params, adverts)
    order = [params.cohort[0]]
    while len(order) < len(params.cohort):
        order.append(next(p for p in graph[order[-1]] if p not in order))
    dropped = (order[0], order[4])
    survivors = tuple(sorted(d for d in params.cohort if d not in dropped))
    assert component_size(order[1], survivors, graph) == 3
    server = SecureSumServer(params, keys)
    for advert in adverts:
        server.receive_advertisement(advert)
    roster = server.roster()
    for d, device in devices.items():
        server.receive_shares(d, device.share_keys(roster, keys))
    inputs = _inputs(params)
    for d in survivors:
        server.receive_masked(devices[d].mask(inputs[d], server.shares_for(d)))
    with pytest.raises(SecureSumWithheld, match="not connected"):
        server.unmask_request()
    with pytest.raises(SecureSumError, match="part of the survivor graph has 3"):
        devices[order[1]].unmask(UnmaskRequest(params.digest, survivors, tuple(sorted(dropped))))


def test_no_mask_derives_from_fewer_than_128_secret_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ChaCha20 key the mask generator is given is 32 bytes, and every seed 16."""
    seen: list[int] = []
    real = crypto.Cipher

    def recording(algorithm: object, mode: object) -> object:
        assert isinstance(algorithm, crypto.algorithms.ChaCha20)
        seen.append(len(algorithm.key))
        return real(algorithm, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(crypto, "Cipher", recording)
    params, identities = _session(6, neighbours=4)
    inputs = _inputs(params)
    _run(params, identities, inputs, drop_after_shares=[params.cohort[0]])
    assert seen and min(seen) >= 32
    assert crypto.SEED_BYTES * 8 >= 128 and crypto.MASK_KEY_BYTES * 8 >= 256
    with pytest.raises(crypto.SecureSumCryptoError):
        crypto.mask_vector(bytes(16), 8, BITS)


def test_a_masked_vector_does_not_depend_on_the_update() -> None:
    """Chi-square: the masked first coordinate of an all-zero and an all-max update look alike.

    Each session draws fresh keys; 400 sessions per input, the first coordinate's top 3 bits
    binned in 8 cells. A dependence as small as a 20% shift in one cell fails the test.
    """
    params_bits = 8

    def masked_first_words(value: int, sessions: int) -> np.ndarray:
        out = np.empty(sessions, dtype=np.int64)
        for i in range(sessions):
            ids = [1, 2, 3]
            params = SessionParams.new(ids, 4, params_bits, 2, 2, 2)
            identities = {d: DeviceIdentity.generate() for d in ids}
            keys = {d: x.public_key for d, x in identities.items()}
            devices = {d: SecureSumDevice(params, d, identities[d]) for d in ids}
            server = SecureSumServer(params, keys)
            for device in devices.values():
                server.receive_advertisement(device.advertise())
            roster = server.roster()
            for d, device in devices.items():
                server.receive_shares(d, device.share_keys(roster, keys))
            vector = np.full(4, value, dtype=np.uint64)
            out[i] = int(devices[1].mask(vector, server.shares_for(1)).vector[0])
        return out

    zeros = masked_first_words(0, 400)
    peaks = masked_first_words((1 << params_bits) - 1, 400)
    counts = np.array([np.bincount(x >> 5, minlength=8) for x in (zeros, peaks)], dtype=float)
    expected = counts.sum(axis=0, keepdims=True) * counts.sum(axis=1, keepdims=True) / counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: the 0.999 quantile is 24.3.
    assert chi2 < 24.3
    # And each is uniform on its own.
    for row in counts:
        assert float(((row - 50.0) ** 2 / 50.0).sum()) < 24.3


def test_the_noisy_sum_decodes_to_the_sum_of_updates() -> None:
    dim, n = 50, 6
    encoding = EncodingParams(dim=dim, clip=1.0, scale=2000.0, bits=32, beta=0.0)
    params, identities = _session(n, neighbours=4, length=encoding.padded_dim)
    params = dataclasses.replace(params, bits=32)
    rng = np.random.default_rng(4)
    updates = {d: rng.normal(size=dim) * 0.05 for d in params.cohort}

    def noisy(update: np.ndarray) -> np.ndarray:
        gen = fresh_generator()
        encoded = encode_sum(update, encoding, params.rotation_seed, gen)
        return add_mod(encoded, to_modular(skellam_noise(4.0, encoding.padded_dim, gen), 32), 32)

    inputs = {d: noisy(updates[d]) for d in params.cohort}
    _, total = _run(params, identities, inputs)
    decoded = decode_sum(total, encoding, params.rotation_seed, n)
    expected = sum(updates.values())
    # Rounding (< 1 per device and coordinate) plus Skellam noise of variance 2 * 4 * 6, over the scale.
    assert np.max(np.abs(decoded - expected)) < 40 / 2000.0


def test_session_params_refuse_unsafe_settings() -> None:
    with pytest.raises(SecureSumError, match="threshold must exceed half"):
        SessionParams.new([1, 2, 3, 4, 5, 6], 4, 16, 4, 2, 2)
    # A complete graph of 4 has degree 3: a threshold of 3 would make every dropout fatal, and
    # 2 of 3 holders is still more than half.
    assert SessionParams.new([1, 2, 3, 4], 4, 16, 4, 2, 2).threshold == 2
    with pytest.raises(SecureSumError, match=r"half the neighbours \(3\)"):
        SessionParams.new([1, 2, 3, 4], 4, 16, 4, 1, 2)
    with pytest.raises(SecureSumError, match="min_contributors must be at least 2"):
        SessionParams.new([1, 2, 3], 4, 16, 2, 2, 1)
    with pytest.raises(SecureSumError, match="neighbours must be even"):
        SessionParams.new([1, 2, 3], 4, 16, 3, 2, 2)
    assert default_neighbours(943) == 20 and default_threshold(20) == 11


def test_the_graph_is_fixed_by_the_advertised_keys_and_symmetric() -> None:
    params, identities = _session(30, neighbours=6)
    devices = [SecureSumDevice(params, d, identities[d]) for d in params.cohort]
    adverts: list[Advertisement] = [device.advertise() for device in devices]
    graph = neighbour_map(params, adverts)
    assert all(len(peers) == 6 for peers in graph.values())
    assert all(a in graph[b] for a, peers in graph.items() for b in peers)
    assert neighbour_map(params, list(reversed(adverts))) == graph
    # Fresh keys (a new session) give a different graph.
    devices2 = [SecureSumDevice(params, d, identities[d]) for d in params.cohort]
    assert neighbour_map(params, [d.advertise() for d in devices2]) != graph


def test_server_refuses_out_of_protocol_messages() -> None:
    params, devices, server, inputs = _through_shares()
    a = params.cohort[0]
    masked = devices[a].mask(inputs[a], server.shares_for(a))
    with pytest.raises(SecureSumError, match="share collection is closed"):
        server.receive_shares(a, [])
    bad = dataclasses.replace(masked, vector=masked.vector.astype(np.int64))
    with pytest.raises(SecureSumError, match="uint64"):
        server.receive_masked(bad)
    big = dataclasses.replace(masked, vector=masked.vector | np.uint64(1 << BITS))
    with pytest.raises(SecureSumError, match="outside the modulus"):
        server.receive_masked(big)
    server.receive_masked(masked)
    with pytest.raises(SecureSumError, match="already sent"):
        server.receive_masked(masked)
    with pytest.raises(SecureSumError, match="another session"):
        server.receive_masked(dataclasses.replace(masked, device_id=params.cohort[1], session_digest=bytes(32)))


def test_encrypted_share_fields_are_bound() -> None:
    share = EncryptedShare(1, 2, b"", b"")
    assert share.associated_data(b"x") != EncryptedShare(2, 1, b"", b"").associated_data(b"x")


def test_the_noise_plan_meets_the_budget_and_a_device_checks_it() -> None:
    cfg = parse_config({"secure-aggregation": True})
    plan = plan_secure_release(cfg.aggregation, cfg.privacy, cfg.train, 1000)
    assert plan.mu_device * plan.min_contributors == pytest.approx(plan.mu_total)
    assert plan.release.mu == pytest.approx(plan.mu_total)
    # The device's accountant: three tasks fit a budget of 8, a fourth does not.
    history = [plan.release.entry()] * 2
    accountant = DeviceAccountant("rdp", 1e-5, 8.0, skellam_history=history)
    epsilon = accountant.check_skellam(plan.release)
    assert epsilon <= 8.0
    with pytest.raises(BudgetExhausted, match="budget 7"):
        DeviceAccountant("rdp", 1e-5, 7.0, skellam_history=history).check_skellam(plan.release)
    # Less noise than planned (a server lying about the minimum) costs more, and is caught by the same check.
    weaker = dataclasses.replace(plan.release, noise_multiplier=plan.release.noise_multiplier / 2)
    assert accountant.epsilon_if_skellam(weaker) > epsilon
    with pytest.raises(BudgetExhausted):
        DeviceAccountant("rdp", 1e-5, epsilon, skellam_history=history).check_skellam(weaker)


def test_a_plan_that_could_wrap_around_is_refused() -> None:
    cfg = parse_config({"secure-aggregation": True, "secure-sum-bits": 16})
    with pytest.raises(ConfigError, match="secure-sum-bits"):
        plan_secure_release(cfg.aggregation, cfg.privacy, cfg.train, 1000)


def test_a_device_saved_between_rounds_goes_on_as_if_it_never_stopped() -> None:
    params, identities = _session(6, neighbours=4)
    keys = {d: i.public_key for d, i in identities.items()}
    server = SecureSumServer(params, keys)
    devices = {d: SecureSumDevice(params, d, identities[d]) for d in params.cohort}

    def reload(d: int) -> None:
        devices[d] = SecureSumDevice.from_state(params, d, identities[d], devices[d].to_state())

    for d, device in devices.items():
        server.receive_advertisement(device.advertise())
        reload(d)
    roster = server.roster()
    for d in params.cohort:
        server.receive_shares(d, devices[d].share_keys(roster, keys))
        reload(d)
    inputs = _inputs(params, seed=7)
    for d in params.cohort:
        server.receive_masked(devices[d].mask(inputs[d], server.shares_for(d)))
        reload(d)
    request = server.unmask_request()
    for d in request.survivors:
        server.receive_unmask(devices[d].unmask(request))
    np.testing.assert_array_equal(server.result(), _expected(inputs, params.cohort, BITS))
    with pytest.raises(SecureSumError, match="saved session state is unusable"):
        SecureSumDevice.from_state(params, params.cohort[0], identities[params.cohort[0]], {"stage": 1})


def test_an_excluded_device_cannot_rejoin_and_bad_advertisements_are_refused_at_receipt() -> None:
    params, devices, server, inputs = _through_shares(6)
    bad = params.cohort[1]
    server.exclude(bad, "its ledger failed verification")
    with pytest.raises(SecureSumError, match="was excluded"):
        server.receive_masked(devices[bad].mask(inputs[bad], server.shares_for(bad)))
    params2, identities2, keys2, devices2, server2 = _advertised()
    honest = devices2[params2.cohort[0]].advertise()
    short = dataclasses.replace(honest, share_public=honest.share_public[:31])
    with pytest.raises(SecureSumError, match="share_public must be 32 bytes"):
        server2.receive_advertisement(short)
    low_order = dataclasses.replace(honest, mask_public=bytes(32))
    with pytest.raises(SecureSumError, match="mask_public"):
        server2.receive_advertisement(low_order)
