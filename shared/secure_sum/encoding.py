"""Integer encoding of a float vector for a secure sum modulo ``2**bits``, with Skellam noise.

A device clips its vector in L2, optionally flattens it with a randomized Hadamard
rotation, scales it, rounds it stochastically to integers under a norm condition and
reduces it modulo ``2**bits``; the masking layer then hides it and the server learns only
the sum modulo ``2**bits``, which :func:`decode_sum` turns back into a float sum. This is
the pipeline of

* [DDG] Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
  Learning with Secure Aggregation", ICML 2021 (arXiv:2102.06387), and
* [SK] Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
  Learning", NeurIPS 2021 (arXiv:2110.04995),

with the device's noise share drawn by :func:`skellam_noise`. :func:`check_no_wrap` refuses a
configuration whose noisy sum could leave the centred range of the modulus.

Adjacency for the norm bounds is add/remove of one device: the bounds are on ONE encoded
vector. Under replace-one adjacency the sensitivity is twice these.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

MIN_BITS = 2
# Sums are centred into int64, so the modulus must leave the sign bit free.
MAX_BITS = 62
DEFAULT_BITS = 32
# [DDG] Section 5 uses beta = exp(-1/2) in its experiments.
DEFAULT_BETA = math.exp(-0.5)
MIN_SEED_BYTES = 16
# Each try passes with probability >= 1 - beta ([DDG] Theorem 1); at the default beta,
# 100 failed tries in a row have probability <= 0.61**100 < 1e-21.
MAX_ROUNDING_TRIES = 100
# float64 keeps 52 fraction bits: below 2**50 a scaled coordinate still carries the
# sub-integer part that stochastic rounding needs.
MAX_SCALED_CLIP = 2.0**50
# Relative slack absorbing float64 error in norms, clipping and the rotation, so that
# every bound below stays an upper bound of the exactly computed quantity.
_FLOAT_SLACK = 1e-9
_ROTATION_DOMAIN = b"fedrec/secure-sum/rotation-signs/v1"
# Hadamard factors up to 2**7: the rotation is a few small matrix products (BLAS),
# several times faster in numpy than log2(d) butterfly passes.
_MAX_FACTOR_BITS = 7

IntArray = NDArray[np.int64]
UIntArray = NDArray[np.uint64]
FloatArray = NDArray[np.float64]


def _is_int(value: object) -> TypeGuard[int | np.integer]:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _check_bits(bits: object, name: str = "bits") -> int:
    if not _is_int(bits) or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return int(bits)


@dataclass(frozen=True, kw_only=True)
class EncodingParams:
    """Public parameters of the integer encoding, identical on every device and the server.

    Parameters
    ----------
    dim
        Length of the float vector before padding.
    clip
        L2 bound the float vector is clipped to.
    scale
        Factor applied (after the rotation) before rounding; ``1 / scale`` is the grid step.
    bits
        The modulus is ``2**bits``.
    rotate
        Apply the randomized Hadamard rotation (pads to a power of two).
    beta
        Conditional rounding slack of [DDG] Theorem 1, in ``[0, 1)``: a rounding is redrawn
        until its norm is within :attr:`rounded_norm_bound`. ``0`` makes the bound the
        deterministic ``clip * scale + sqrt(d)``.
    """

    dim: int
    clip: float
    scale: float
    bits: int = DEFAULT_BITS
    rotate: bool = True
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        if not _is_int(self.dim) or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        _check_bits(self.bits)
        for name in ("clip", "scale"):
            value = _real(name, getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if self.clip * self.scale > MAX_SCALED_CLIP:
            raise ValueError(
                f"clip * scale must be <= 2**50 so float64 keeps the fraction stochastic rounding uses, "
                f"got clip={self.clip!r}, scale={self.scale!r}"
            )
        if not isinstance(self.rotate, bool | np.bool_):
            raise ValueError(f"rotate must be a bool, got {self.rotate!r}")
        beta = _real("beta", self.beta)
        if not (math.isfinite(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")

    @property
    def modulus(self) -> int:
        """``2**bits``."""
        return 1 << self.bits

    @property
    def padded_dim(self) -> int:
        """Length of the encoded vector: the next power of two of ``dim`` if rotating, else ``dim``."""
        if not self.rotate:
            return self.dim
        return 1 << (self.dim - 1).bit_length()

    @property
    def scaled_clip(self) -> float:
        """``clip * scale``: the L2 bound of the scaled vector before rounding."""
        return float(self.clip) * float(self.scale)

    @property
    def rounded_norm_bound(self) -> float:
        """L2 bound of one encoded (integer, centred) vector: its L2 sensitivity.

        [DDG] Theorem 1 / Eq. (2) (conditional randomized rounding), with the minimum of the
        two bounds from [DDG] Proposition 22 (numbering of arXiv:2102.06387, as cited by the
        reference code in google-research/federated ``distributed_dp``), grid step 1 in the
        scaled domain, ``c = clip * scale`` and ``d = padded_dim``::

            min( sqrt(c**2 + d/4 + sqrt(2 log(1/beta)) * (c + sqrt(d)/2)),  c + sqrt(d) )

        The second term always holds (each coordinate moves by less than 1); the first holds
        for an unconditioned rounding with probability >= 1 - beta, and :func:`encode`
        enforces it by redrawing. With ``beta = 0`` only the second term applies.
        """
        c = self.scaled_clip
        d = float(self.padded_dim)
        always = c + math.sqrt(d)
        if self.beta == 0:
            return always
        conditional = math.sqrt(c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / self.beta)) * (c + math.sqrt(d) / 2.0))
        return min(always, conditional)

    @property
    def rounded_l1_norm_bound(self) -> float:
        """L1 bound of one encoded vector (the L1 sensitivity in the Skellam RDP bound of [SK]).

        ``min(l2 * sqrt(d), l2**2)`` with ``l2 = rounded_norm_bound``: Cauchy-Schwarz gives the
        first; on integers ``|v_i| <= v_i**2``, so ``||v||_1 <= ||v||_2**2``, the second (as in
        the reference ``rounded_l1_norm_bound`` of google-research/federated ``distributed_dp``).
        """
        l2 = self.rounded_norm_bound
        return l2 * min(math.sqrt(self.padded_dim), l2)


# ---------------------------------------------------------------------------------------
# Randomized Hadamard rotation
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sylvester(m: int) -> FloatArray:
    """The unnormalized ``m x m`` Sylvester Hadamard matrix (entries +-1), read-only."""
    h = np.ones((1, 1))
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def fwht(x: FloatArray) -> FloatArray:
    """Unnormalized Walsh-Hadamard transform ``H x`` (Sylvester order) of a length-``2**k`` vector.

    ``H_{2^k}`` is the Kronecker product of ``H_2`` with itself ``k`` times, so grouping the
    factors into a few ``H_m`` (``m <= 2**7``) applies it as one small matrix product per
    group along a reshaped axis: O(d * sum(m)) flops in BLAS, versus log2(d) memory-bound
    butterfly passes.
    """
    if x.ndim != 1 or not _is_power_of_two(x.shape[0]):
        raise ValueError(f"x must be 1-D with a power-of-two length, got shape {x.shape}")
    n = x.shape[0]
    k = n.bit_length() - 1
    groups = max(1, math.ceil(k / _MAX_FACTOR_BITS))
    sizes = [k // groups + (1 if i < k % groups else 0) for i in range(groups)]
    # Every step below returns a new array, so only the no-op case needs a copy.
    y = np.array(x, dtype=np.float64) if k == 0 else np.asarray(x, dtype=np.float64)
    before, after = 1, n
    for bits in sizes:
        if bits == 0:
            continue
        m = 1 << bits
        after //= m
        h = _sylvester(m)
        if after == 1:
            y = y.reshape(before, m) @ h  # h is symmetric
        else:
            y = np.matmul(h, y.reshape(before, m, after))
        before *= m
    return y.reshape(n)


def _fwht_rows(x: FloatArray) -> FloatArray:
    """:func:`fwht` of every row of a 2-D array (rows of power-of-two length), in one pass."""
    rows, n = x.shape
    k = n.bit_length() - 1
    groups = max(1, math.ceil(k / _MAX_FACTOR_BITS))
    sizes = [k // groups + (1 if i < k % groups else 0) for i in range(groups)]
    y = np.array(x, dtype=np.float64)
    before, after = 1, n
    for bits in sizes:
        if bits == 0:
            continue
        m = 1 << bits
        after //= m
        y = np.matmul(_sylvester(m), y.reshape(rows * before, m, after))
        before *= m
    return y.reshape(rows, n)


def _sign_masks(rotation_seed: bytes, n: int) -> UIntArray:
    """The rotation's ``n`` random sign bits as float64 sign-bit masks, from the public seed.

    ChaCha20 keyed by SHA-256 of a domain tag and the seed, so every party derives the same
    signs, and an unrelated use of the same seed bytes gives unrelated signs.
    """
    if not isinstance(rotation_seed, bytes) or len(rotation_seed) < MIN_SEED_BYTES:
        raise ValueError(f"rotation_seed must be at least {MIN_SEED_BYTES} bytes")
    key = hashlib.sha256(_ROTATION_DOMAIN + len(rotation_seed).to_bytes(4, "big") + rotation_seed).digest()
    # A fresh key per seed, so a fixed nonce is never reused with one key.
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    raw = stream.update(b"\0" * ((n + 7) // 8))
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n]
    return bits.astype(np.uint64) << np.uint64(63)


def _apply_signs(x: FloatArray, rotation_seed: bytes) -> FloatArray:
    # Flipping the IEEE sign bit is D x exactly, and several times faster than multiplying.
    flipped = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64) ^ _sign_masks(rotation_seed, x.shape[0])
    return flipped.view(np.float64)


def rademacher_signs(rotation_seed: bytes, n: int) -> FloatArray:
    """The ``n`` random signs (+-1.0) of the rotation's ``D``, derived from the public ``rotation_seed``."""
    return _apply_signs(np.ones(n), rotation_seed)


def rotate(x: FloatArray, rotation_seed: bytes) -> FloatArray:
    """Randomized Hadamard rotation ``U x = H D x / sqrt(d)`` of a power-of-two-length vector.

    The signs come first: ``(H D x)_i = sum_j H_ij D_j x_j / sqrt(d)`` is a Rademacher sum,
    which is what flattens the coordinates ([DDG] Lemma 29). ``U`` is orthogonal.
    """
    n = x.shape[0]
    return fwht(_apply_signs(x, rotation_seed)) / math.sqrt(n)


def unrotate(y: FloatArray, rotation_seed: bytes) -> FloatArray:
    """Inverse of :func:`rotate`: ``U^T y = D H y / sqrt(d)`` (``H`` is symmetric, ``D**2 = I``)."""
    n = y.shape[0]
    return _apply_signs(fwht(y) / math.sqrt(n), rotation_seed)


# ---------------------------------------------------------------------------------------
# Modular arithmetic on uint64 arrays
# ---------------------------------------------------------------------------------------


def to_modular(values: NDArray[np.integer], bits: int) -> UIntArray:
    """Reduce signed or unsigned integers modulo ``2**bits`` into ``uint64``.

    Two's complement makes the int64 -> uint64 view a reduction modulo ``2**64``; masking
    then reduces modulo ``2**bits``, which divides ``2**64``.
    """
    bits = _check_bits(bits)
    arr = np.asarray(values)
    if arr.dtype.kind == "i":
        wide = arr.astype(np.int64, copy=False).view(np.uint64)
    elif arr.dtype.kind == "u":
        wide = arr.astype(np.uint64, copy=False)
    else:
        raise ValueError(f"values must be an integer array, got dtype {arr.dtype}")
    return wide & np.uint64((1 << bits) - 1)


def _check_modular(name: str, values: object, bits: int, shape: tuple[int, ...] | None = None) -> UIntArray:
    if not isinstance(values, np.ndarray) or values.dtype != np.uint64:
        dtype = getattr(values, "dtype", type(values).__name__)
        raise ValueError(f"{name} must be a uint64 numpy array, got {dtype}")
    if shape is not None and values.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {values.shape}")
    if values.size and int(values.max()) >= 1 << bits:
        raise ValueError(f"{name} has values >= 2**{bits}: not reduced modulo 2**bits")
    return values


def add_mod(a: UIntArray, b: UIntArray, bits: int) -> UIntArray:
    """``(a + b) mod 2**bits`` for uint64 arrays already reduced modulo ``2**bits``."""
    bits = _check_bits(bits)
    _check_modular("a", a, bits)
    _check_modular("b", b, bits, a.shape)
    # uint64 addition wraps modulo 2**64, a multiple of 2**bits.
    return (a + b) & np.uint64((1 << bits) - 1)


def to_signed(values: UIntArray, bits: int) -> IntArray:
    """Map residues in ``[0, 2**bits)`` to the centred representatives in ``[-2**(bits-1), 2**(bits-1))``."""
    bits = _check_bits(bits)
    _check_modular("values", values, bits)
    signed = values.astype(np.int64)
    signed[signed >= 1 << (bits - 1)] -= 1 << bits
    return signed


# ---------------------------------------------------------------------------------------
# Encoding and decoding
# ---------------------------------------------------------------------------------------


class ConditionalRoundingFailed(RuntimeError):
    """No stochastic rounding within the norm bound after :data:`MAX_ROUNDING_TRIES` tries."""


def _uniform(rng: np.random.Generator, n: int) -> FloatArray:
    # One seam for the rounding draws (tests force a worst-case rounding through it).
    return rng.random(n)


def _check_params(params: object) -> EncodingParams:
    if not isinstance(params, EncodingParams):
        raise ValueError(f"params must be an EncodingParams, got {type(params).__name__}")
    return params


def _check_seed(params: EncodingParams, rotation_seed: object) -> None:
    if params.rotate and (not isinstance(rotation_seed, bytes) or len(rotation_seed) < MIN_SEED_BYTES):
        raise ValueError(f"rotation_seed must be at least {MIN_SEED_BYTES} bytes when rotating")


def conditional_round(y: FloatArray, bound: float, rng: np.random.Generator) -> IntArray:
    """Unbiased stochastic rounding of ``y``, redrawn until the L2 norm is <= ``bound``.

    Each coordinate rounds up with probability equal to its fractional part, so a single
    draw is unbiased. Conditioning on the norm ([DDG] Theorem 1) makes ``bound`` a hard
    sensitivity at the price of a small bias, which that theorem bounds.

    Raises
    ------
    ConditionalRoundingFailed
        If :data:`MAX_ROUNDING_TRIES` draws in a row exceed ``bound``.
    """
    floor = np.floor(y)
    frac = np.subtract(y, floor)
    # float64 sums of squares of integers < 2**51 carry relative error far below this
    # slack, so an accepted vector's exact norm is <= bound.
    limit = bound * bound * (1.0 - _FLOAT_SLACK)
    for _ in range(MAX_ROUNDING_TRIES):
        # In place: the uniforms become the 0/1 round-up indicators, then the rounded values.
        rounded = _uniform(rng, y.shape[0])
        np.less(rounded, frac, out=rounded)
        np.add(floor, rounded, out=rounded)
        if float(np.dot(rounded, rounded)) <= limit:
            return rounded.astype(np.int64)
    raise ConditionalRoundingFailed(
        f"no stochastic rounding within the L2 bound {bound:.6g} after {MAX_ROUNDING_TRIES} tries"
    )


def _check_vector(x: object, dim: int) -> FloatArray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy array, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if x.shape != (dim,):
        raise ValueError(f"x must have shape ({dim},) (params.dim), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x has non-finite values (nan or inf)")
    return x.astype(np.float64)


def encode(
    x: NDArray[np.floating], params: EncodingParams, rotation_seed: bytes, rng: np.random.Generator
) -> UIntArray:
    """Encode a float vector as integers modulo ``2**bits`` (no noise; see :func:`skellam_noise`).

    Parameters
    ----------
    x
        float32/float64 vector of shape ``(params.dim,)``, finite.
    params
        The aggregate's public encoding parameters.
    rotation_seed
        PUBLIC seed of the rotation, the same for every device of one aggregate (>= 16 bytes);
        ignored when ``params.rotate`` is false.
    rng
        The device's private generator for the rounding draws.

    Returns
    -------
    numpy.ndarray
        uint64 vector of shape ``(params.padded_dim,)`` with values in ``[0, 2**bits)``, whose
        centred representative has L2 norm <= ``params.rounded_norm_bound``.
    """
    params = _check_params(params)
    _check_seed(params, rotation_seed)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    y = _check_vector(x, params.dim)
    with np.errstate(over="ignore"):
        norm = math.sqrt(float(np.dot(y, y)))
    if not math.isfinite(norm):
        # Finite but huge entries overflow the sum of squares; rescaling first keeps the
        # direction instead of clipping the whole vector to zero.
        peak = float(np.abs(y).max())
        norm = peak * math.sqrt(float(np.dot(y / peak, y / peak)))
    if norm > params.clip:
        y *= params.clip / norm
    if params.rotate:
        padded = np.zeros(params.padded_dim)
        padded[: params.dim] = y
        y = rotate(padded, rotation_seed)
    y *= params.scale
    rounded = conditional_round(y, params.rounded_norm_bound, rng)
    return to_modular(rounded, params.bits)


def encode_sum(
    total: NDArray[np.floating], params: EncodingParams, rotation_seed: bytes, rng: np.random.Generator
) -> UIntArray:
    """Encode a SUM of per-record vectors, each already clipped to ``params.clip`` by the caller.

    Rotates, scales and rounds stochastically once (``floor(y + u)``, ``u`` uniform: each
    coordinate rounds up with probability equal to its fractional part), with no clipping of
    the sum and no conditioning. Sensitivity to one record, by coupling the rounding draws:
    for sums ``x`` and ``x'`` one clipped record apart and any fixed ``u``,
    ``|floor(x_i + u_i) - floor(x'_i + u_i)| <= |x_i - x'_i| + [x_i != x'_i]``, so the two
    rounded vectors are at most ``clip * scale + sqrt(d)`` apart in L2; Rényi divergence is
    jointly quasi-convex (van Erven and Harremoës 2014, Theorem 13), so the mixture over
    ``u`` of noisy outputs keeps the shifted-noise bound at that sensitivity, which is
    ``params.rounded_norm_bound`` when ``params.beta == 0``.
    """
    params = _check_params(params)
    _check_seed(params, rotation_seed)
    if params.beta != 0:
        raise ValueError("encode_sum rounds unconditionally: its sensitivity is the beta = 0 bound")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    y = _check_vector(total, params.dim)
    if params.rotate:
        padded = np.zeros(params.padded_dim)
        padded[: params.dim] = y
        y = rotate(padded, rotation_seed)
    y *= params.scale
    rounded = np.floor(y + _uniform(rng, y.shape[0])).astype(np.int64)
    return to_modular(rounded, params.bits)


def decode_sum(total: UIntArray, params: EncodingParams, rotation_seed: bytes, contributors: int) -> FloatArray:
    """Turn the modular sum of ``contributors`` encodings back into the float SUM of their vectors.

    Centres the residues, divides by ``scale``, undoes the rotation and drops the padding.
    The result carries the rounding error and the summed noise divided by ``scale``; it is
    only the true sum if the integer sum never left ``(-2**(bits-1), 2**(bits-1))``, which
    :func:`check_no_wrap` makes overwhelmingly likely. ``contributors`` is validated but not
    needed by this linear map; it keeps the call explicit about what was summed.
    """
    params = _check_params(params)
    _check_seed(params, rotation_seed)
    if not _is_int(contributors) or contributors < 1:
        raise ValueError(f"contributors must be a positive integer, got {contributors!r}")
    _check_modular("total", total, params.bits, (params.padded_dim,))
    y = to_signed(total, params.bits).astype(np.float64) / params.scale
    if params.rotate:
        y = unrotate(y, rotation_seed)
    return y[: params.dim].copy()


def skellam_noise(mu: float, size: int, rng: np.random.Generator) -> IntArray:
    """Symmetric Skellam noise ``Poisson(mu) - Poisson(mu)`` (variance ``2 mu``) as int64.

    Sums of independent Skellams are Skellam ([SK] Section 3), so ``n`` devices adding this
    give the aggregate exactly ``Sk(n mu, n mu)``.
    """
    if not (math.isfinite(_real("mu", mu)) and mu >= 0):
        raise ValueError(f"mu must be finite and >= 0, got {mu!r}")
    if not _is_int(size) or size < 0:
        raise ValueError(f"size must be a non-negative integer, got {size!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return (rng.poisson(mu, size) - rng.poisson(mu, size)).astype(np.int64)


# ---------------------------------------------------------------------------------------
# Wrap-around
# ---------------------------------------------------------------------------------------


def _log_skellam_tail(lam: float, t: float) -> float:
    """log of the Chernoff bound on ``P(Z >= t)`` for ``Z ~ Sk(lam, lam)``, ``t >= 0``.

    ``E exp(theta Z) = exp(2 lam (cosh theta - 1))``; the minimising ``theta = asinh(t / 2 lam)``
    gives ``-t asinh(u) + 2 lam (sqrt(1 + u**2) - 1)`` with ``u = t / (2 lam)``.
    """
    u = t / (2.0 * lam)
    # sqrt(1 + u^2) - 1 written without cancellation for small u.
    return -t * math.asinh(u) + 2.0 * lam * (u * u / (math.sqrt(1.0 + u * u) + 1.0))


def skellam_abs_tail_bound(lam: float, prob: float) -> float:
    """A ``t`` with ``P(|Z| >= t) <= prob`` for ``Z ~ Sk(lam, lam)``, by the Chernoff bound.

    ``P(|Z| >= t) <= 2 exp(-t asinh(t / 2 lam) + 2 lam (sqrt(1 + (t / 2 lam)**2) - 1))``
    (symmetry and the moment generating function); the returned ``t`` is the smallest such
    threshold found by bisection, rounded up. ``lam = 0`` returns 0.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    if lam == 0:
        return 0.0
    target = math.log(prob / 2.0)
    lo, hi = 0.0, max(1.0, math.sqrt(lam))
    while _log_skellam_tail(lam, hi) > target:
        lo, hi = hi, 2.0 * hi
    # The bound decreases in t; keep hi on the safe side.
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _log_skellam_tail(lam, mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    return hi


class WrapAroundRisk(ValueError):
    """The noisy secure sum could leave the centred range of ``2**secure-sum-bits``."""


@dataclass(frozen=True)
class WrapBound:
    """Per-coordinate bounds on the centred noisy sum of ``contributors`` encodings.

    With probability at least ``1 - failure_prob``, every coordinate of the integer sum
    has absolute value at most ``signal + noise``; it round-trips when that is at most
    ``limit = 2**(bits-1) - 1``.
    """

    signal: float
    noise: float
    limit: int
    failure_prob: float
    rotation_bound_used: bool

    @property
    def safe(self) -> bool:
        """Whether ``signal + noise <= limit``."""
        return self.signal + self.noise <= self.limit


def _check_wrap_args(
    params: object, contributors: object, mu_device: object, failure_prob: object
) -> tuple[EncodingParams, int, float, float]:
    checked = _check_params(params)
    if not _is_int(contributors) or contributors < 1:
        raise ValueError(f"contributors must be a positive integer, got {contributors!r}")
    mu = _real("mu_device", mu_device)
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu_device must be finite and >= 0, got {mu_device!r}")
    prob = _real("failure_prob", failure_prob)
    if not 0.0 < prob < 1.0:
        raise ValueError(f"failure_prob must be in (0, 1), got {failure_prob!r}")
    return checked, int(contributors), mu, prob


def wrap_bound(params: EncodingParams, contributors: int, mu_device: float, failure_prob: float = 1e-9) -> WrapBound:
    """Bound every coordinate of the centred sum of ``contributors`` noisy encodings.

    Two valid bounds are computed and the smaller total is kept (choosing between two
    bounds that each hold with probability >= 1 - failure_prob keeps that guarantee):

    * Worst case (any rotation): a coordinate of one encoding is an integer with
      ``|v_i| <= ||v||_2 <= rounded_norm_bound`` and ``|v_i| <= ceil(|scale * y_i|) <=
      floor(clip * scale) + 1``; ``n`` of them sum to at most ``n`` times the smaller.
      All of ``failure_prob`` goes to the noise.
    * Rotation (``rotate`` only): rounding is linear up to an error of less than 1 per device
      and coordinate, and the rotated SUM is ``U X`` with ``||X|| <= n clip``. ``(U X)_i`` is a
      Rademacher sum over the random signs, so Hoeffding gives ``P(|(U X)_i| >= t) <= 2
      exp(-t**2 d / (2 n**2 clip**2))`` (the subgaussian flattening of the randomized Hadamard
      transform, [DDG] Lemma 29); union over the ``d`` coordinates at ``failure_prob / 2``
      gives ``signal = n clip scale sqrt(2 log(4 d / failure_prob) / d) + n``. This holds over
      the draw of the public rotation seed, for updates that do not depend on it.

    Noise: ``n`` devices' Skellam shares sum to ``Sk(n mu, n mu)`` per coordinate; the
    Chernoff bound of :func:`skellam_abs_tail_bound`, union over ``d`` coordinates.
    """
    params, n, mu_device, failure_prob = _check_wrap_args(params, contributors, mu_device, failure_prob)
    d = params.padded_dim
    c = params.scaled_clip
    slack = 1.0 + _FLOAT_SLACK

    def noise(prob: float) -> float:
        return skellam_abs_tail_bound(n * mu_device, prob / d) * slack if mu_device > 0 else 0.0

    per_device = min(math.floor(c * slack) + 1, math.floor(params.rounded_norm_bound))
    best = (n * float(per_device), noise(failure_prob), False)
    if params.rotate:
        rotated = n * c * math.sqrt(2.0 * math.log(4.0 * d / failure_prob) / d) * slack + n
        candidate = (rotated, noise(failure_prob / 2.0), True)
        if candidate[0] + candidate[1] < best[0] + best[1]:
            best = candidate
    return WrapBound(
        signal=best[0],
        noise=best[1],
        limit=(1 << (params.bits - 1)) - 1,
        failure_prob=failure_prob,
        rotation_bound_used=best[2],
    )


def check_no_wrap(params: EncodingParams, contributors: int, mu_device: float, failure_prob: float = 1e-9) -> None:
    """Refuse a configuration whose noisy sum could wrap modulo ``2**bits``.

    Raises
    ------
    WrapAroundRisk
        If, with probability above ``failure_prob``, some coordinate of the sum of
        ``contributors`` encodings plus their Skellam noise (``mu_device`` per device) could
        leave ``(-2**(bits-1), 2**(bits-1))`` by :func:`wrap_bound`.
    """
    bound = wrap_bound(params, contributors, mu_device, failure_prob)
    if bound.safe:
        return
    fits = max_contributors(params, mu_device, failure_prob)
    raise WrapAroundRisk(
        f"the secure sum could wrap around: {contributors} contributors need up to "
        f"{bound.signal:.4g} (signal) + {bound.noise:.4g} (noise) per coordinate, beyond 2**{params.bits - 1} - 1 "
        f"(failure probability {failure_prob:g}); this config fits at most {fits} contributors. "
        f"Raise secure-sum-bits (now {params.bits}), lower secure-sum-scale (now {params.scale:g}) "
        f"or clip (now {params.clip:g}), or lower min-contributors (now {contributors})"
    )


def max_contributors(params: EncodingParams, mu_device: float, failure_prob: float = 1e-9) -> int:
    """The largest number of contributors that :func:`check_no_wrap` accepts (0 if none).

    Both the signal and the noise bound grow with ``n`` (a Skellam of larger mean has larger
    Chernoff bound at every threshold), so the accepted ``n`` form a prefix of 1, 2, ...
    """

    def ok(n: int) -> bool:
        return wrap_bound(params, n, mu_device, failure_prob).safe

    if not ok(1):
        return 0
    # Each device adds at least 1 to the signal bound, so n <= 2**(bits-1) - 1.
    lo, hi = 1, 1
    cap = (1 << (params.bits - 1)) - 1
    while hi < cap and ok(min(2 * hi, cap)):
        lo = hi = min(2 * hi, cap)
    if hi == cap:
        return cap
    hi = min(2 * hi, cap)  # fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
