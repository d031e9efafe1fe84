"""The secure sum's session parameters, its messages and its neighbour graph.

One session sums the encoded vectors of one cohort (a synchronous round, or an
asynchronous buffer whose devices were all dispatched the same model version). Its four
rounds, after SecAgg+ (Bell et al., CCS 2020) over SecAgg (Bonawitz et al., CCS 2017):

1. each device sends a signed :class:`Advertisement` of two fresh X25519 public keys;
2. each device sends every neighbour an :class:`EncryptedShare` of its two seeds;
3. each device sends its :class:`MaskedInput`;
4. the server sends an :class:`UnmaskRequest` naming survivors and dropouts, and each
   survivor answers once with an :class:`UnmaskReply`.

Both halves (``client.secure_sum_device``, ``server.secure_sum_server``) build and check
these types; ``shared.protocol`` carries them over Flower messages.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from numpy.typing import NDArray

from shared.secure_sum.crypto import MAX_SHARES

SESSION_ID_BYTES = 16
DOMAIN = b"fedrec/secure-sum/v1/"
MIN_NEIGHBOURS = 2


class SecureSumError(ValueError):
    """A secure-sum message or state is invalid: the session cannot go on as asked."""


class SecureSumWithheld(RuntimeError):
    """The sum cannot be unmasked safely (too few contributors, shares or a ledger failure)."""


MAX_DEVICE_ID = 2**63 - 1


def _id_bytes(device_id: int) -> bytes:
    return int(device_id).to_bytes(8, "big", signed=False)


def check_advertisement_keys(advert: Advertisement, *, trial_exchange: bool = True) -> None:
    """Refuse an advertisement whose keys or commitment are not 32 bytes, or whose keys no peer could use.

    With ``trial_exchange`` (the server, at receipt) an X25519 exchange with each advertised
    key catches a low-order point before it can break every neighbour's key agreement later;
    a device's own key agreement refuses such a point for the neighbours it uses.

    Raises
    ------
    SecureSumError
        Naming the device and the field.
    """
    for name in ("share_public", "mask_public", "seed_commitment"):
        value = getattr(advert, name)
        if not isinstance(value, bytes) or len(value) != 32:
            raise SecureSumError(f"device {advert.device_id}'s advertisement: {name} must be 32 bytes")
    if not isinstance(advert.signature, str):
        raise SecureSumError(f"device {advert.device_id}'s advertisement: the signature must be text")
    if advert.share_public == advert.mask_public:
        raise SecureSumError(f"device {advert.device_id} advertised the same key twice")
    if not trial_exchange:
        return
    probe = X25519PrivateKey.generate()
    for name in ("share_public", "mask_public"):
        try:
            shared = probe.exchange(X25519PublicKey.from_public_bytes(getattr(advert, name)))
        except ValueError as error:
            raise SecureSumError(f"device {advert.device_id}'s advertisement: {name} is not a usable key") from error
        if shared == bytes(32):
            raise SecureSumError(f"device {advert.device_id}'s advertisement: {name} is a low-order point")


@dataclass(frozen=True)
class SessionParams:
    """What every party of one session agrees on; :attr:`digest` binds every message to it.

    Attributes
    ----------
    session_id:
        16 random bytes from the server (fresh per session, so messages cannot be replayed).
    cohort:
        The device ids invited, sorted.
    length:
        Words per vector (the encoding's padded dimension).
    bits:
        The sum is taken modulo ``2**bits``.
    neighbours:
        Each device's degree in the masking graph (even; the graph is complete when the
        roster has at most ``neighbours + 1`` devices).
    threshold:
        Shares needed to recover one seed; more than half the neighbours (of the actual
        degree, ``cohort - 1`` when the cohort is smaller than ``neighbours + 1``). A roster
        smaller than the cohort only lowers the degree, so the threshold stays above half.
    min_contributors:
        The sum is unmasked only over at least this many devices; each device's noise share
        is sized for it.
    """

    session_id: bytes
    cohort: tuple[int, ...]
    length: int
    bits: int
    neighbours: int
    threshold: int
    min_contributors: int

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise SecureSumError(f"session_id must be {SESSION_ID_BYTES} bytes")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in self.cohort):
            raise SecureSumError("cohort must hold integer device ids")
        if list(self.cohort) != sorted(set(self.cohort)) or any(not 0 <= d <= MAX_DEVICE_ID for d in self.cohort):
            raise SecureSumError(f"cohort must be sorted, distinct device ids in 0..{MAX_DEVICE_ID}")
        if self.length < 1:
            raise SecureSumError("length must be positive")
        if not 2 <= self.bits <= 62:
            raise SecureSumError("bits must be in 2..62")
        if self.neighbours < MIN_NEIGHBOURS or self.neighbours % 2 or self.neighbours > MAX_SHARES:
            raise SecureSumError(f"neighbours must be even, in {MIN_NEIGHBOURS}..{MAX_SHARES - 1}")
        # Each seed is shared among the device's actual neighbours: ``neighbours``, or every
        # other device of a small cohort (complete graph). More than half of them must be needed,
        # so that no two disjoint groups of holders (one asked for the self-mask seed, the other
        # for the pairwise key) can both recover a device's secrets.
        degree = min(self.neighbours, max(1, len(self.cohort) - 1))
        if not degree // 2 < self.threshold <= degree:
            raise SecureSumError(
                f"threshold must exceed half the neighbours ({degree}) and not exceed them; got {self.threshold}"
            )
        if self.min_contributors < 2:
            raise SecureSumError("min_contributors must be at least 2 (a sum of one is that device's vector)")

    @classmethod
    def new(
        cls, cohort: Iterable[int], length: int, bits: int, neighbours: int, threshold: int, min_contributors: int
    ) -> SessionParams:
        """Parameters for a new session with a fresh random id from the OS CSPRNG."""
        return cls(
            secrets.token_bytes(SESSION_ID_BYTES),
            tuple(sorted({int(d) for d in cohort})),
            length,
            bits,
            neighbours,
            threshold,
            min_contributors,
        )

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding of every field."""
        h = hashlib.sha256(DOMAIN + b"session")
        h.update(self.session_id)
        for value in (self.length, self.bits, self.neighbours, self.threshold, self.min_contributors):
            h.update(int(value).to_bytes(8, "big"))
        h.update(len(self.cohort).to_bytes(8, "big"))
        for device in self.cohort:
            h.update(_id_bytes(device))
        return h.digest()

    @property
    def rotation_seed(self) -> bytes:
        """The public seed of the encoding's random rotation (the same for every device)."""
        return hashlib.sha256(DOMAIN + b"rotation" + self.digest).digest()


@dataclass(frozen=True)
class Advertisement:
    """A device's two fresh public keys and the commitment to its self-mask seed, signed."""

    device_id: int
    session_digest: bytes
    share_public: bytes
    mask_public: bytes
    seed_commitment: bytes
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """What the device's Ed25519 ledger key signs (each field length-prefixed: no two readings)."""
        fields = (
            self.session_digest,
            _id_bytes(self.device_id),
            self.share_public,
            self.mask_public,
            self.seed_commitment,
        )
        return DOMAIN + b"advertisement" + b"".join(len(f).to_bytes(4, "big") + f for f in fields)


@dataclass(frozen=True)
class EncryptedShare:
    """One device's shares of its two seeds, encrypted to one neighbour."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes

    def associated_data(self, session_digest: bytes) -> bytes:
        """The AEAD's associated data: session, sender and recipient."""
        return DOMAIN + b"share" + session_digest + _id_bytes(self.sender) + _id_bytes(self.recipient)


@dataclass(frozen=True)
class MaskedInput:
    """A device's encoded vector plus its masks, modulo ``2**bits``."""

    device_id: int
    session_digest: bytes
    vector: NDArray[np.uint64] = field(repr=False)


@dataclass(frozen=True)
class UnmaskRequest:
    """The server's one request: who survived (their self masks go) and who dropped (their pair masks go)."""

    session_digest: bytes
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskReply:
    """A survivor's shares: of survivors' self-mask seeds and of dropouts' mask-agreement seeds."""

    device_id: int
    session_digest: bytes
    seed_shares: Mapping[int, bytes]
    mask_shares: Mapping[int, bytes]


def graph_order(params: SessionParams, roster: Sequence[Advertisement]) -> list[int]:
    """The devices of the roster in the ring order of the masking graph.

    The order is a hash of the session digest and every advertised key, so it is fixed only
    once every device has committed to fresh keys: no party can choose its neighbours.
    """
    h = hashlib.sha256(DOMAIN + b"graph" + params.digest)
    for advert in sorted(roster, key=lambda a: a.device_id):
        h.update(_id_bytes(advert.device_id) + advert.share_public + advert.mask_public + advert.seed_commitment)
    seed = h.digest()
    return sorted((a.device_id for a in roster), key=lambda d: hashlib.sha256(seed + _id_bytes(d)).digest())


def neighbour_map(params: SessionParams, roster: Sequence[Advertisement]) -> dict[int, tuple[int, ...]]:
    """Each roster device's neighbours, sorted: a Harary ring of degree ``params.neighbours``.

    Device at ring position ``p`` is joined to positions ``p ± 1 .. p ± neighbours/2``; with
    ``len(roster) <= neighbours + 1`` every pair is joined.
    """
    order = graph_order(params, roster)
    n = len(order)
    if n <= params.neighbours + 1:
        return {d: tuple(sorted(x for x in order if x != d)) for d in order}
    half = params.neighbours // 2
    result: dict[int, tuple[int, ...]] = {}
    for position, device in enumerate(order):
        around = {order[(position + step) % n] for step in range(-half, half + 1) if step}
        result[device] = tuple(sorted(around))
    return result


def component_size(device: int, members: Iterable[int], graph: Mapping[int, Sequence[int]]) -> int:
    """How many of ``members`` are reachable from ``device`` through edges between members.

    The server holds every survivor's masked vector, every survivor's self-mask seed and
    every dropout's agreement key, so it can sum each connected component of the survivors
    on its own: a device must never help unmask if its component is smaller than the minimum.
    """
    inside = set(members)
    if device not in inside:
        return 0
    seen = {device}
    stack = [device]
    while stack:
        current = stack.pop()
        for peer in graph.get(current, ()):
            if peer in inside and peer not in seen:
                seen.add(peer)
                stack.append(peer)
    return len(seen)


def default_neighbours(cohort_size: int) -> int:
    """The masking graph's default degree: 2 * ceil(log2 n), rounded up to even and capped.

    Bell et al. show O(log n) suffices. A Harary ring of degree k stays connected unless
    k/2 ring-consecutive devices all drop (probability about n * rate^(k/2): 1e-7 at n = 943
    and a 10% dropout rate), and a disconnected survivor graph is withheld, never unmasked.
    Recovery costs one Shamir interpolation of ``threshold`` points per survivor.
    """
    k = max(MIN_NEIGHBOURS, 2 * math.ceil(math.log2(max(cohort_size, 2))))
    return min(k, MAX_SHARES - 1 - (MAX_SHARES - 1) % 2)


def default_threshold(neighbours: int) -> int:
    """Just over half the neighbours: no two disjoint halves of them can both recover a seed."""
    return neighbours // 2 + 1
