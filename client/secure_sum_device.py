"""The device's half of the secure sum: a state machine that never reveals what it must not.

A :class:`SecureSumDevice` takes part in one session (see ``shared.secure_sum.rounds``).
It refuses anything out of order, anything not bound to its session, peers whose
advertisement is not signed by their registered ledger key, and an unmask request that
would let the server see less than a sum over ``min_contributors`` devices (by its own
view). It answers the unmask request once only and never reveals both seeds of one peer.

Threat model: an honest-but-curious server. An *active* server that sends different
unmask requests to different devices can recover one device's vector on a sparse graph
(SecAgg's consistency round, where devices sign the request they answer, is not
implemented yet; docs/secure-aggregation.md).

The vector a device masks is its noisy encoding (``client/secure_training.py``).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from shared.privacy.identity import DeviceIdentity, verify_signature
from shared.secure_sum.crypto import (
    PAIR_MASK_PURPOSE,
    SHARE_KEY_PURPOSE,
    SecureSumCryptoError,
    agree,
    commitment,
    decrypt_share,
    encrypt_share,
    mask_agreement_key,
    mask_vector,
    new_x25519,
    random_seed,
    self_mask_key,
    share_index,
    split_secret,
    x25519_public_bytes,
)
from shared.secure_sum.encoding import add_mod
from shared.secure_sum.rounds import (
    Advertisement,
    EncryptedShare,
    MaskedInput,
    SecureSumError,
    SessionParams,
    UnmaskReply,
    UnmaskRequest,
    check_advertisement_keys,
    component_size,
    neighbour_map,
)

_PLAINTEXT_BYTES = 8 + 8 + 2 * 17


class _Stage(Enum):
    NEW = 0
    ADVERTISED = 1
    SHARED = 2
    MASKED = 3
    UNMASKED = 4


def fresh_generator() -> np.random.Generator:
    """A noise generator seeded with 128 bits from the OS CSPRNG, never stored or sent."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def _id8(device_id: int) -> bytes:
    return int(device_id).to_bytes(8, "big")


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def _bytes_list(value: object) -> list[bytes]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return [_bytes(v) for v in value]


class SecureSumDevice:
    """One device's part in one secure-sum session.

    Parameters
    ----------
    params:
        The session's parameters, as the server sent them.
    device_id:
        This device's id (it must be in ``params.cohort``).
    identity:
        The device's Ed25519 ledger identity; it signs the key advertisement.
    """

    def __init__(self, params: SessionParams, device_id: int, identity: DeviceIdentity) -> None:
        if device_id not in params.cohort:
            raise SecureSumError(f"device {device_id} is not in this session's cohort")
        self.params = params
        self.device_id = device_id
        self._identity = identity
        self._digest = params.digest
        self._share_key = new_x25519()
        self._seed = random_seed()
        self._mask_seed = random_seed()
        self._mask_key = mask_agreement_key(self._mask_seed, self._digest)
        self._stage = _Stage.NEW
        self._adverts: dict[int, Advertisement] = {}
        self._neighbours: tuple[int, ...] = ()
        self._graph: dict[int, tuple[int, ...]] = {}
        # Shares held for each neighbour that delivered them: (its seed share, its mask-seed share).
        self._held: dict[int, tuple[bytes, bytes]] = {}

    def to_state(self) -> dict[str, int | bytes | list[bytes]]:
        """This device's secrets and progress, to keep on the device between rounds (never sent).

        The Flower node's own state holds it (``context.state``): on a deployed device, the
        SuperNode's memory; a device that restarts mid-session has simply dropped out.
        """
        adverts = [
            _id8(a.device_id) + a.share_public + a.mask_public + a.seed_commitment + a.signature.encode()
            for a in (self._adverts[d] for d in sorted(self._adverts))
        ]
        held = [_id8(peer) + seed + mask for peer, (seed, mask) in sorted(self._held.items())]
        return {
            "stage": self._stage.value,
            "share-key": self._share_key.private_bytes_raw(),
            "seed": self._seed,
            "mask-seed": self._mask_seed,
            "adverts": adverts,
            "held": held,
        }

    @classmethod
    def from_state(
        cls, params: SessionParams, device_id: int, identity: DeviceIdentity, state: Mapping[str, object]
    ) -> SecureSumDevice:
        """Restore a device saved by :meth:`to_state` (for the same session parameters).

        Raises
        ------
        SecureSumError
            If the saved state is incomplete or malformed.
        """
        try:
            device = cls(params, device_id, identity)
            device._share_key = X25519PrivateKey.from_private_bytes(_bytes(state["share-key"]))
            device._seed = _bytes(state["seed"])
            device._mask_seed = _bytes(state["mask-seed"])
            device._mask_key = mask_agreement_key(device._mask_seed, device._digest)
            device._stage = _Stage(int(state["stage"]))  # type: ignore[call-overload]
            adverts = {}
            for raw in _bytes_list(state["adverts"]):
                advert = Advertisement(
                    int.from_bytes(raw[:8], "big"),
                    device._digest,
                    raw[8:40],
                    raw[40:72],
                    raw[72:104],
                    raw[104:].decode(),
                )
                adverts[advert.device_id] = advert
            device._adverts = adverts
            if adverts:
                device._graph = neighbour_map(params, list(adverts.values()))
                device._neighbours = device._graph[device_id]
            device._held = {
                int.from_bytes(raw[:8], "big"): (raw[8:25], raw[25:42]) for raw in _bytes_list(state["held"])
            }
        except (KeyError, ValueError, TypeError, UnicodeDecodeError, SecureSumCryptoError) as error:
            raise SecureSumError(f"the device's saved session state is unusable: {error}") from error
        return device

    def _expect(self, stage: _Stage, action: str) -> None:
        if self._stage is not stage:
            raise SecureSumError(f"device {self.device_id} cannot {action} now (stage {self._stage.name.lower()})")

    def advertise(self) -> Advertisement:
        """Round 1: two fresh public keys and a commitment to the self-mask seed, signed."""
        self._expect(_Stage.NEW, "advertise")
        advert = Advertisement(
            device_id=self.device_id,
            session_digest=self._digest,
            share_public=x25519_public_bytes(self._share_key),
            mask_public=x25519_public_bytes(self._mask_key),
            seed_commitment=commitment(self._seed),
        )
        signed = Advertisement(**{**advert.__dict__, "signature": self._identity.sign(advert.signed_bytes())})
        self._stage = _Stage.ADVERTISED
        return signed

    def share_keys(self, roster: Sequence[Advertisement], ledger_keys: Mapping[int, str]) -> list[EncryptedShare]:
        """Round 2: check the roster, then encrypt seed shares to each neighbour.

        Every advertisement must be of this session, from the cohort, unique and well formed;
        the neighbours' (the devices this one exchanges keys with) must be signed by their
        registered ledger keys. A non-neighbour's advertisement only feeds the hash that
        orders the graph; its own neighbours verify its signature, so a forged one aborts the
        session there (checking all of them here would cost 0.1 ms per cohort device).

        Raises
        ------
        SecureSumError
            If an advertisement is for another session, from outside the cohort, duplicated,
            malformed, a neighbour's is not signed by its registered ledger key, this
            device's own advertisement is missing or altered, or the roster is below
            ``min_contributors``.
        """
        self._expect(_Stage.ADVERTISED, "share keys")
        adverts: dict[int, Advertisement] = {}
        for advert in roster:
            if advert.session_digest != self._digest:
                raise SecureSumError(f"device {advert.device_id}'s advertisement belongs to another session")
            if advert.device_id not in self.params.cohort:
                raise SecureSumError(f"device {advert.device_id} is not in the cohort")
            if advert.device_id in adverts:
                raise SecureSumError(f"device {advert.device_id} advertised twice")
            check_advertisement_keys(advert, trial_exchange=False)
            adverts[advert.device_id] = advert
        own = adverts.get(self.device_id)
        if own is None or own.mask_public != x25519_public_bytes(self._mask_key):
            raise SecureSumError("this device's own advertisement is missing or altered in the roster")
        if len(adverts) < self.params.min_contributors:
            raise SecureSumError(
                f"the roster has {len(adverts)} devices, fewer than min_contributors {self.params.min_contributors}"
            )
        graph = neighbour_map(self.params, list(adverts.values()))
        for peer in graph[self.device_id]:
            advert = adverts[peer]
            ledger_key = ledger_keys.get(peer)
            if ledger_key is None or not verify_signature(ledger_key, advert.signed_bytes(), advert.signature):
                raise SecureSumError(f"device {peer}'s advertisement is not signed by its ledger key")
        self._adverts = adverts
        self._graph = graph
        self._neighbours = self._graph[self.device_id]
        count = len(self._neighbours)
        if count < self.params.threshold:
            raise SecureSumError(f"{count} neighbours cannot hold a threshold of {self.params.threshold}")
        seed_shares = split_secret(self._seed, self.params.threshold, count)
        mask_shares = split_secret(self._mask_seed, self.params.threshold, count)
        out = []
        for peer, seed_share, mask_share in zip(self._neighbours, seed_shares, mask_shares, strict=True):
            key = agree(
                self._share_key, adverts[peer].share_public, SHARE_KEY_PURPOSE, self._digest, self.device_id, peer
            )
            plaintext = self.device_id.to_bytes(8, "big") + peer.to_bytes(8, "big") + seed_share + mask_share
            envelope = EncryptedShare(self.device_id, peer, b"", b"")
            nonce, ciphertext = encrypt_share(key, plaintext, envelope.associated_data(self._digest))
            out.append(EncryptedShare(self.device_id, peer, nonce, ciphertext))
        self._stage = _Stage.SHARED
        return out

    def _open(self, share: EncryptedShare) -> tuple[bytes, bytes]:
        key = agree(
            self._share_key,
            self._adverts[share.sender].share_public,
            SHARE_KEY_PURPOSE,
            self._digest,
            self.device_id,
            share.sender,
        )
        try:
            plaintext = decrypt_share(key, share.nonce, share.ciphertext, share.associated_data(self._digest))
        except SecureSumCryptoError as error:
            raise SecureSumError(f"the share from device {share.sender}: {error}") from error
        if len(plaintext) != _PLAINTEXT_BYTES:
            raise SecureSumError(f"the share from device {share.sender} has the wrong length")
        sender = int.from_bytes(plaintext[:8], "big")
        recipient = int.from_bytes(plaintext[8:16], "big")
        if (sender, recipient) != (share.sender, self.device_id):
            raise SecureSumError(f"the share from device {share.sender} names another sender or recipient")
        seed_share, mask_share = plaintext[16:33], plaintext[33:]
        try:
            if share_index(seed_share) != share_index(mask_share):
                raise SecureSumError(f"the share from device {share.sender} mixes two share indices")
        except SecureSumCryptoError as error:
            raise SecureSumError(f"the share from device {share.sender}: {error}") from error
        return seed_share, mask_share

    def mask(self, encoded: NDArray[np.uint64], shares: Sequence[EncryptedShare]) -> MaskedInput:
        """Round 3: add the self mask and a pair mask with every neighbour that delivered shares.

        ``encoded`` is this device's noisy encoding (``client.secure_training.secure_contribution``).

        Raises
        ------
        SecureSumError
            If a share is not addressed to this device, comes from a non-neighbour, is
            duplicated or fails authentication, or fewer neighbours than the threshold
            delivered shares (this device's own seeds could then not be recovered).
        """
        self._expect(_Stage.SHARED, "mask")
        vector = np.asarray(encoded)
        if vector.dtype != np.uint64 or vector.shape != (self.params.length,):
            raise SecureSumError(f"the encoded vector must be uint64 of length {self.params.length}")
        if vector.size and int(vector.max()) >> self.params.bits:
            raise SecureSumError(f"the encoded vector has values outside [0, 2**{self.params.bits})")
        held: dict[int, tuple[bytes, bytes]] = {}
        for share in shares:
            if not (isinstance(share.nonce, bytes) and isinstance(share.ciphertext, bytes)):
                raise SecureSumError(f"a malformed share reached device {self.device_id}")
            if share.recipient != self.device_id:
                raise SecureSumError(f"a share addressed to device {share.recipient} reached device {self.device_id}")
            if share.sender not in self._neighbours:
                raise SecureSumError(f"device {share.sender} is not a neighbour of device {self.device_id}")
            if share.sender in held:
                raise SecureSumError(f"device {share.sender} delivered two shares")
            held[share.sender] = self._open(share)
        if len(held) < self.params.threshold:
            raise SecureSumError(
                f"only {len(held)} neighbours delivered shares; the threshold is {self.params.threshold}"
            )
        bits, length = self.params.bits, self.params.length
        total = add_mod(vector, mask_vector(self_mask_key(self._seed, self._digest), length, bits), bits)
        modulus_mask = np.uint64((1 << bits) - 1)
        for peer in sorted(held):
            pair = mask_vector(
                agree(
                    self._mask_key,
                    self._adverts[peer].mask_public,
                    PAIR_MASK_PURPOSE,
                    self._digest,
                    self.device_id,
                    peer,
                ),
                length,
                bits,
            )
            # The lower id adds the pair mask, the higher subtracts it: the pair cancels in the sum.
            total = add_mod(total, pair, bits) if self.device_id < peer else (total - pair) & modulus_mask
        self._held = held
        self._stage = _Stage.MASKED
        return MaskedInput(self.device_id, self._digest, total)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Round 4, once only: reveal survivors' seed shares and dropouts' mask-seed shares.

        Raises
        ------
        SecureSumError
            If the request is for another session or repeated, names a device as both
            survivor and dropout, leaves out a neighbour that delivered shares, omits this
            device, or would let the server sum fewer than ``min_contributors`` devices
            (the survivors' total, or this device's connected part of the survivor graph).
        """
        self._expect(_Stage.MASKED, "unmask")
        # Answer at most once, whatever follows: a second request could name other survivors.
        self._stage = _Stage.UNMASKED
        if request.session_digest != self._digest:
            raise SecureSumError("the unmask request belongs to another session")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise SecureSumError("the unmask request lists a device twice")
        if survivors & dropped:
            raise SecureSumError(f"devices {sorted(survivors & dropped)} are listed as survivors and as dropped")
        if not survivors | dropped <= set(self._adverts):
            raise SecureSumError("the unmask request names devices outside the roster")
        if self.device_id not in survivors:
            raise SecureSumError("the unmask request does not list this device as a survivor")
        missing = set(self._held) - survivors - dropped
        if missing:
            raise SecureSumError(f"the unmask request does not classify neighbours {sorted(missing)}")
        if len(survivors) < self.params.min_contributors:
            raise SecureSumError(
                f"{len(survivors)} survivors are fewer than min_contributors {self.params.min_contributors}"
            )
        reachable = component_size(self.device_id, survivors, self._graph)
        if reachable < self.params.min_contributors:
            raise SecureSumError(
                f"this device's part of the survivor graph has {reachable} devices, fewer than "
                f"min_contributors {self.params.min_contributors}"
            )
        seed_shares = {peer: shares[0] for peer, shares in self._held.items() if peer in survivors}
        mask_shares = {peer: shares[1] for peer, shares in self._held.items() if peer in dropped}
        return UnmaskReply(self.device_id, self._digest, seed_shares, mask_shares)
