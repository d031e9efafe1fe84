"""The secure sum's integer encoding: round trips, rotation, rounding, modular arithmetic, wrap-around."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from shared.secure_sum import encoding
from shared.secure_sum.encoding import (
    ConditionalRoundingFailed,
    EncodingParams,
    WrapAroundRisk,
    add_mod,
    check_no_wrap,
    conditional_round,
    decode_sum,
    encode,
    fwht,
    max_contributors,
    rademacher_signs,
    rotate,
    skellam_abs_tail_bound,
    skellam_noise,
    to_modular,
    to_signed,
    unrotate,
    wrap_bound,
)

SEED = bytes(range(16))
CONFIG_KEYS = ("secure-sum-bits", "secure-sum-scale", "clip", "min-contributors")


def _dense_hadamard(n: int) -> np.ndarray:
    """Sylvester's construction H_{2m} = [[H, H], [H, -H]], written independently of the module."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


def _butterfly(x: np.ndarray) -> np.ndarray:
    """Textbook in-place fast Walsh-Hadamard transform (Sylvester order)."""
    y = x.astype(np.float64).copy()
    h = 1
    while h < y.size:
        for i in range(0, y.size, 2 * h):
            a = y[i : i + h].copy()
            b = y[i + h : i + 2 * h].copy()
            y[i : i + h] = a + b
            y[i + h : i + 2 * h] = a - b
        h *= 2
    return y


def _clipped(x: np.ndarray, clip: float) -> np.ndarray:
    return x * min(1.0, clip / float(np.linalg.norm(x)))


def _centred(v: np.ndarray, bits: int) -> np.ndarray:
    return to_signed(v, bits)


# --- round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("rotate_flag", [True, False])
def test_sum_of_encodings_decodes_to_the_clipped_float_sum(rotate_flag: bool) -> None:
    n, dim, clip, scale = 4, 4096, 1.0, 64.0
    params = EncodingParams(dim=dim, clip=clip, scale=scale, bits=32, rotate=rotate_flag)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(dim) * s / math.sqrt(dim) for s in (0.5, 0.9, 2.0, 3.0)]  # two get clipped
    total = np.zeros(params.padded_dim, dtype=np.uint64)
    for x in xs:
        total = add_mod(total, encode(x, params, SEED, rng), params.bits)
    decoded = decode_sum(total, params, SEED, contributors=n)
    truth = sum(_clipped(x, clip) for x in xs)
    err = decoded - truth
    d = params.padded_dim
    # Each device's rounding error per (rotated) coordinate lies in (-1, 1) with mean 0 and
    # variance <= 1/4, so the summed error E_i has E[E_i^2] <= n/4, and the orthogonal
    # unrotation keeps ||E||. Hoeffding on sum_i E_i^2 (terms in [0, n^2]) puts
    # ||E||^2 >= 2 * n d / 4 at probability <= exp(-d / (8 n^2)) = exp(-32); the norm
    # condition inflates that by at most (1 - beta)^-n, still negligible.
    assert float(err @ err) <= 2 * n * d / 4 / scale**2
    # And deterministically each coordinate's error is below n / scale before unrotation.
    assert float(np.linalg.norm(err)) < n * math.sqrt(d) / scale


def test_noise_decodes_linearly() -> None:
    params = EncodingParams(dim=300, clip=1.0, scale=100.0, bits=24)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(300)
    enc = encode(x, params, SEED, rng)
    noise = skellam_noise(20.0, params.padded_dim, rng)
    noisy = add_mod(enc, to_modular(noise, params.bits), params.bits)
    diff = decode_sum(noisy, params, SEED, 1) - decode_sum(enc, params, SEED, 1)
    expected = unrotate(noise.astype(np.float64), SEED)[:300] / params.scale
    np.testing.assert_allclose(diff, expected, atol=1e-9)


# --- rotation ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 8, 128, 256, 512, 2048])
def test_fwht_matches_dense_hadamard(n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n)
    np.testing.assert_allclose(fwht(x), _dense_hadamard(n) @ x, atol=1e-9)


@pytest.mark.parametrize("n", [1 << 15, 1 << 17])
def test_fwht_matches_butterfly_at_model_sizes(n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n)
    np.testing.assert_allclose(fwht(x), _butterfly(x) if n <= 1 << 15 else _fwht_numpy(x), atol=1e-8)


def _fwht_numpy(x: np.ndarray) -> np.ndarray:
    """Vectorised butterfly (log2 n passes), for the size where the Python loop is too slow."""
    y = x.astype(np.float64).copy()
    h = 1
    while h < y.size:
        v = y.reshape(-1, 2, h)
        a = v[:, 0, :].copy()
        v[:, 0, :] += v[:, 1, :]
        v[:, 1, :] = a - v[:, 1, :]
        h *= 2
    return y


def test_rotation_is_h_d_over_sqrt_d_and_orthogonal() -> None:
    n = 64
    signs = rademacher_signs(SEED, n)
    assert set(np.unique(signs)) == {-1.0, 1.0}
    u = _dense_hadamard(n) @ np.diag(signs) / math.sqrt(n)
    np.testing.assert_allclose(u @ u.T, np.eye(n), atol=1e-12)
    x = np.random.default_rng(3).standard_normal(n)
    np.testing.assert_allclose(rotate(x, SEED), u @ x, atol=1e-12)
    np.testing.assert_allclose(unrotate(x, SEED), u.T @ x, atol=1e-12)


def test_rotation_inverts_and_keeps_norm_at_model_size() -> None:
    x = np.random.default_rng(4).standard_normal(1 << 17)
    y = rotate(x, SEED)
    np.testing.assert_allclose(unrotate(y, SEED), x, atol=1e-9)
    assert abs(np.linalg.norm(y) - np.linalg.norm(x)) < 1e-9 * np.linalg.norm(x)


def test_rotation_is_seeded_and_flattens() -> None:
    n = 1024
    # A one-hot vector's rotation is one column of H D / sqrt(n): every entry is +-1/sqrt(n).
    e = np.zeros(n)
    e[5] = 1.0
    np.testing.assert_allclose(np.abs(rotate(e, SEED)), np.full(n, 1 / math.sqrt(n)), atol=1e-12)
    x = np.random.default_rng(5).standard_normal(n)
    np.testing.assert_array_equal(rotate(x, SEED), rotate(x, bytes(SEED)))
    other = bytes([1]) + SEED[1:]
    assert np.mean(rademacher_signs(SEED, n) == rademacher_signs(other, n)) < 0.6


# --- rounding ---------------------------------------------------------------------------


def _binding_params(beta: float) -> tuple[EncodingParams, np.ndarray]:
    # x = 3.5 * ones(64), clip = ||x|| = 28, scale 1: every coordinate has fraction 1/2, so
    # ||r||^2 has mean ||x||^2 + d/4 and standard deviation sqrt(d) * 7 / 2 = 28, while the
    # bound allows sqrt(2 log(1/beta)) * (28 + 4) above the mean.
    return EncodingParams(dim=64, clip=28.0, scale=1.0, rotate=False, beta=beta), np.full(64, 3.5)


@pytest.mark.parametrize("beta", [0.9, encoding.DEFAULT_BETA])
def test_conditional_rounding_respects_the_bound(beta: float) -> None:
    params, x = _binding_params(beta)
    bound = params.rounded_norm_bound
    rng = np.random.default_rng(6)
    trials = 400
    unconditioned = [conditional_round(x, math.inf, rng) for _ in range(trials)]
    over = sum(float(np.linalg.norm(r)) > bound for r in unconditioned)
    # The input exercises the condition (at beta = 0.9 about a third exceed) ...
    if beta == 0.9:
        assert over > 0
    # ... and [DDG] Theorem 1: an unconditioned rounding exceeds it with probability <= beta
    # (binomial: P(count > beta * N + 5 sqrt(N)) is negligible).
    assert over <= beta * trials + 5 * math.sqrt(trials)
    for _ in range(trials):
        v = _centred(encode(x, params, SEED, rng), params.bits)
        assert float(np.linalg.norm(v)) <= bound
        assert float(np.abs(v).sum()) <= params.rounded_l1_norm_bound


def test_conditional_rounding_gives_up_after_max_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    params, x = _binding_params(encoding.DEFAULT_BETA)
    # Uniforms of 0 round every coordinate up: ||4 * ones(64)||^2 = 1024 exceeds
    # bound^2 = 784 + 16 + 1 * (28 + 4) = 832.
    calls: list[int] = []

    def zeros(rng: np.random.Generator, n: int) -> np.ndarray:
        calls.append(n)
        return np.zeros(n)

    monkeypatch.setattr(encoding, "_uniform", zeros)
    assert params.rounded_norm_bound == pytest.approx(math.sqrt(832))
    with pytest.raises(ConditionalRoundingFailed):
        encode(x, params, SEED, np.random.default_rng(0))
    assert len(calls) == encoding.MAX_ROUNDING_TRIES


def test_stochastic_rounding_is_unbiased() -> None:
    params = EncodingParams(dim=8, clip=100.0, scale=10.0, rotate=False, beta=0.0)
    x = np.array([0.01, 0.05, -0.07, 0.123, -0.999, 0.5, 0.0, -0.35])
    rng = np.random.default_rng(7)
    draws = 20_000
    mean = np.mean([_centred(encode(x, params, SEED, rng), params.bits) for _ in range(draws)], axis=0)
    # Hoeffding per coordinate (values in an interval of length 1), union over 8 at 1e-9.
    tol = math.sqrt(math.log(2 * 8 / 1e-9) / (2 * draws))
    np.testing.assert_array_less(np.abs(mean - x * params.scale), tol)


def test_rounded_norm_bounds_follow_the_paper() -> None:
    # c = clip * scale = 10.5, d = 16: sqrt(c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2))
    # = sqrt(110.25 + 4 + 1 * 12.5) at beta = e^-1/2, and c + sqrt(d) = 14.5.
    p = EncodingParams(dim=16, clip=1.0, scale=10.5, rotate=False)
    assert p.rounded_norm_bound == pytest.approx(math.sqrt(126.75))
    assert p.rounded_l1_norm_bound == pytest.approx(math.sqrt(126.75) * 4)
    assert EncodingParams(dim=16, clip=1.0, scale=10.5, rotate=False, beta=0.0).rounded_norm_bound == 14.5
    # Small scale: l2 is about sqrt(d)/2 = 128 < sqrt(d), so the integer bound l2^2 undercuts l2 sqrt(d).
    q = EncodingParams(dim=1 << 16, clip=1.0, scale=0.5, rotate=False)
    assert q.rounded_norm_bound < 256
    assert q.rounded_l1_norm_bound == pytest.approx(q.rounded_norm_bound**2)


@pytest.mark.parametrize(("dim", "rotate_flag", "padded"), [(1000, True, 1024), (1024, True, 1024), (1, True, 1)])
def test_padded_dim(dim: int, rotate_flag: bool, padded: int) -> None:
    assert EncodingParams(dim=dim, clip=1.0, scale=1.0, rotate=rotate_flag).padded_dim == padded
    assert EncodingParams(dim=dim, clip=1.0, scale=1.0, rotate=False).padded_dim == dim


# --- modular arithmetic -----------------------------------------------------------------


def test_negative_values_round_trip_modulo() -> None:
    bits = 8
    v = to_modular(np.array([-1, -128, 127, 0, -2], dtype=np.int64), bits)
    np.testing.assert_array_equal(v, np.array([255, 128, 127, 0, 254], dtype=np.uint64))
    np.testing.assert_array_equal(to_signed(v, bits), [-1, -128, 127, 0, -2])
    for bits in (2, 8, 32, 62):
        half = 1 << (bits - 1)
        ints = np.random.default_rng(bits).integers(-half, half, size=1000, dtype=np.int64)
        ints[:2] = (-half, half - 1)
        np.testing.assert_array_equal(to_signed(to_modular(ints, bits), bits), ints)


@pytest.mark.parametrize("bits", [2, 31, 62])
def test_add_mod_matches_python_integers(bits: int) -> None:
    m = 1 << bits
    rng = np.random.default_rng(bits)
    a = rng.integers(0, m, size=500, dtype=np.uint64)
    b = rng.integers(0, m, size=500, dtype=np.uint64)
    a[0] = b[0] = m - 1
    expected = [(int(x) + int(y)) % m for x, y in zip(a, b, strict=True)]
    assert [int(z) for z in add_mod(a, b, bits)] == expected


def test_huge_finite_input_is_clipped_not_zeroed() -> None:
    # ||x||^2 overflows float64, yet x / ||x|| = (0.6, 0.8, 0) is well defined.
    params = EncodingParams(dim=3, clip=1.0, scale=10.0, bits=16, rotate=False)
    x = np.array([6e307, 8e307, 0.0])
    v = _centred(encode(x, params, SEED, np.random.default_rng(0)), params.bits)
    np.testing.assert_array_equal(v, [6, 8, 0])


def test_negative_encodings_sum_and_decode() -> None:
    # scale * x is integral, so rounding is exact and the decoded sum is exact.
    params = EncodingParams(dim=3, clip=10.0, scale=4.0, bits=16, rotate=False)
    x = np.array([-0.25, -1.0, 0.5])
    rng = np.random.default_rng(8)
    one = encode(x, params, SEED, rng)
    np.testing.assert_array_equal(one, np.array([(1 << 16) - 1, (1 << 16) - 4, 2], dtype=np.uint64))
    total = add_mod(one, encode(x, params, SEED, rng), params.bits)
    np.testing.assert_array_equal(decode_sum(total, params, SEED, 2), 2 * x)


# --- wrap-around ------------------------------------------------------------------------


def _small_params() -> EncodingParams:
    # Without rotation one coordinate of an encoding is at most ceil(10.5) = 11 (and
    # floor(rounded_norm_bound) = floor(11.26) = 11), so n devices stay within
    # 2**7 - 1 = 127 exactly when 11 n <= 127: n <= 11.
    return EncodingParams(dim=16, clip=1.0, scale=10.5, bits=8, rotate=False)


def test_check_no_wrap_accepts_and_refuses_at_the_derived_limit() -> None:
    params = _small_params()
    assert max_contributors(params, 0.0) == 127 // 11
    check_no_wrap(params, 11, 0.0)
    with pytest.raises(WrapAroundRisk) as info:
        check_no_wrap(params, 12, 0.0)
    assert isinstance(info.value, ValueError)
    for key in CONFIG_KEYS:
        assert key in str(info.value)


def test_extreme_case_wraps_only_past_the_accepted_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    params = _small_params()
    # Every device puts its whole norm on one coordinate and rounds up: 10.5 -> 11.
    monkeypatch.setattr(encoding, "_uniform", lambda rng, n: np.zeros(n))
    x = np.zeros(16)
    x[0] = 1.0
    rng = np.random.default_rng(9)
    for n, wraps in ((11, False), (12, True)):
        total = np.zeros(16, dtype=np.uint64)
        for _ in range(n):
            total = add_mod(total, encode(x, params, SEED, rng), params.bits)
        decoded = decode_sum(total, params, SEED, n)
        assert bool(decoded[0] < 0) is wraps  # 132 - 256 = -124 once it wraps
        if not wraps:
            assert decoded[0] == pytest.approx(11 * 11 / 10.5)


def test_simulation_at_the_accepted_limit_with_noise_and_rotation_does_not_wrap() -> None:
    params = EncodingParams(dim=1000, clip=1.0, scale=300.0, bits=16)
    mu = 40.0
    n = max_contributors(params, mu)
    assert n >= 2
    check_no_wrap(params, n, mu)
    with pytest.raises(WrapAroundRisk):
        check_no_wrap(params, n + 1, mu)
    bound = wrap_bound(params, n, mu)
    assert bound.safe and bound.rotation_bound_used
    rng = np.random.default_rng(10)
    # All devices send the same clipped vector: the sum has the largest norm, n * clip.
    x = rng.standard_normal(1000)
    limit = (1 << 15) - 1
    for _ in range(20):
        plain = np.zeros(params.padded_dim, dtype=np.int64)
        total = np.zeros(params.padded_dim, dtype=np.uint64)
        for _ in range(n):
            v = to_modular(
                _centred(encode(x, params, SEED, rng), params.bits) + skellam_noise(mu, params.padded_dim, rng),
                params.bits,
            )
            plain += _centred(v, params.bits)
            total = add_mod(total, v, params.bits)
        assert int(np.abs(plain).max()) <= min(limit, bound.signal + bound.noise)
        np.testing.assert_array_equal(_centred(total, params.bits), plain)


def test_noise_alone_can_exhaust_the_modulus() -> None:
    params = EncodingParams(dim=1024, clip=1.0, scale=1.0, bits=12)
    # Sk(n mu) needs about 6.5 standard deviations sqrt(2 n mu) of headroom at 1e-9 / 1024.
    check_no_wrap(params, 10, 1000.0)
    with pytest.raises(WrapAroundRisk):
        check_no_wrap(params, 10, 40_000.0)


@pytest.mark.parametrize("lam", [0.5, 10.0, 1e3, 1e6])
@pytest.mark.parametrize("prob", [1e-3, 1e-9])
def test_skellam_tail_bound_holds_against_the_exact_distribution(lam: float, prob: float) -> None:
    t = skellam_abs_tail_bound(lam, prob)
    # P(|Z| >= t) = 2 P(Z >= ceil(t)) = 2 sf(ceil(t) - 1) by symmetry.
    exact = 2 * stats.skellam.sf(math.ceil(t) - 1, lam, lam)
    assert exact <= prob
    assert skellam_abs_tail_bound(2 * lam, prob) > t
    assert skellam_abs_tail_bound(0.0, prob) == 0.0


def test_skellam_noise_moments() -> None:
    rng = np.random.default_rng(11)
    z = skellam_noise(5.0, 200_000, rng)
    assert z.dtype == np.int64
    # Var = 2 mu = 10; the sample variance's sd is about 10 * sqrt(2.1 / N) = 0.032.
    assert abs(float(z.mean())) < 0.05
    assert abs(float(z.var()) - 10.0) < 0.3
    np.testing.assert_array_equal(skellam_noise(0.0, 5, rng), np.zeros(5, dtype=np.int64))


# --- validation -------------------------------------------------------------------------

GOOD: dict[str, Any] = {"dim": 10, "clip": 1.0, "scale": 100.0}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bits", 1),
        ("bits", 63),
        ("bits", 32.0),
        ("bits", True),
        ("clip", 0.0),
        ("clip", -1.0),
        ("clip", math.inf),
        ("clip", math.nan),
        ("scale", 0.0),
        ("scale", math.nan),
        ("scale", 2.0**51),
        ("beta", 1.0),
        ("beta", -0.1),
        ("beta", math.nan),
        ("dim", 0),
        ("dim", 2.5),
        ("rotate", "yes"),
    ],
)
def test_bad_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        EncodingParams(**{**GOOD, field: value})


@pytest.mark.parametrize(
    "x",
    [
        np.array([1.0, np.nan] + [0.0] * 8),
        np.array([np.inf] + [0.0] * 9),
        np.arange(10),
        np.zeros(11),
        np.zeros((10, 1)),
        [0.0] * 10,
    ],
)
def test_encode_rejects_bad_vectors(x: object) -> None:
    params = EncodingParams(**GOOD)
    with pytest.raises(ValueError, match="x "):
        encode(x, params, SEED, np.random.default_rng(0))  # type: ignore[arg-type]


def test_encode_and_decode_reject_bad_arguments() -> None:
    params = EncodingParams(**GOOD)
    x = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match="rotation_seed"):
        encode(x, params, b"short", np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        encode(x, params, SEED, np.random.RandomState(0))  # type: ignore[arg-type]
    total = encode(x, params, SEED, np.random.default_rng(0))
    with pytest.raises(ValueError, match="contributors"):
        decode_sum(total, params, SEED, 0)
    with pytest.raises(ValueError, match="total"):
        decode_sum(total.astype(np.int64), params, SEED, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total"):
        decode_sum(total[:-1], params, SEED, 1)
    with pytest.raises(ValueError, match="total"):
        decode_sum(total + np.uint64(1 << 32), params, SEED, 1)
    with pytest.raises(ValueError, match="values"):
        to_modular(np.zeros(3), 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        to_modular(np.zeros(3, dtype=np.int64), 63)
    with pytest.raises(ValueError, match="mu"):
        skellam_noise(-1.0, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="failure_prob"):
        check_no_wrap(params, 2, 1.0, failure_prob=0.0)
    with pytest.raises(ValueError, match="contributors"):
        check_no_wrap(params, 0, 1.0)


def test_encoding_a_sum_is_unbiased_and_one_record_moves_it_by_at_most_the_sensitivity() -> None:
    """encode_sum's coupling bound: the same rounding draws on sums one record apart differ by <= c*scale + sqrt(d)."""
    from shared.secure_sum.encoding import encode_sum

    params = EncodingParams(dim=300, clip=1.0, scale=64.0, bits=32, beta=0.0)
    seed = b"s" * 32
    gen = np.random.default_rng(0)
    records = gen.normal(size=(20, 300))
    records /= np.maximum(1.0, np.linalg.norm(records, axis=1, keepdims=True))  # each clipped to 1
    with_all, without_last = records.sum(axis=0), records[:-1].sum(axis=0)
    worst = 0.0
    for draw in range(200):
        a = to_signed(encode_sum(with_all, params, seed, np.random.default_rng(draw)), params.bits)
        b = to_signed(encode_sum(without_last, params, seed, np.random.default_rng(draw)), params.bits)
        worst = max(worst, float(np.linalg.norm((a - b).astype(np.float64))))
    assert worst <= params.rounded_norm_bound
    assert params.rounded_norm_bound == pytest.approx(64.0 + np.sqrt(params.padded_dim))
    # Unbiased: the mean of many decodings is the sum.
    decoded = np.mean(
        [
            decode_sum(encode_sum(with_all, params, seed, np.random.default_rng(100 + i)), params, seed, 1)
            for i in range(400)
        ],
        axis=0,
    )
    assert np.max(np.abs(decoded - with_all)) < 5 * 0.5 / 64.0 / np.sqrt(400) * 4
    with pytest.raises(ValueError, match="beta = 0"):
        encode_sum(with_all, EncodingParams(dim=300, clip=1.0, scale=64.0), seed, gen)
