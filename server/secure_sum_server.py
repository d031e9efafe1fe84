"""The server's half of the secure sum: collect, route, and unmask only a safe sum.

A :class:`SecureSumServer` runs one session (see ``shared.secure_sum.rounds``) as pure
logic: the federation feeds it the devices' messages and sends on what it returns. It
checks every advertisement against the device's registered ledger key, routes encrypted
shares it cannot read, and unmasks the sum only when at least ``min_contributors`` devices
survive, the survivors' masking graph is connected, and every seed it needs is recovered
from ``threshold`` shares and matches its commitment or advertised key. Anything short of
that raises :class:`SecureSumWithheld`: the masked vectors are discarded, never decoded.

What the server learns: the sum modulo ``2**bits``, who advertised, who delivered shares,
who sent a masked vector and when. It never holds a device's seed and its pair keys at once
for a device whose vector it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from shared.privacy.identity import verify_signature
from shared.secure_sum.crypto import (
    AEAD_NONCE_BYTES,
    PAIR_MASK_PURPOSE,
    SHARE_BYTES,
    SecureSumCryptoError,
    agree,
    combine_shares,
    commitment,
    mask_agreement_key,
    mask_vector,
    self_mask_key,
    share_index,
    x25519_public_bytes,
)
from shared.secure_sum.encoding import add_mod
from shared.secure_sum.rounds import (
    Advertisement,
    EncryptedShare,
    MaskedInput,
    SecureSumError,
    SecureSumWithheld,
    SessionParams,
    UnmaskReply,
    UnmaskRequest,
    check_advertisement_keys,
    component_size,
    neighbour_map,
)


def _is_share(share: EncryptedShare) -> bool:
    return (
        isinstance(share.nonce, bytes)
        and isinstance(share.ciphertext, bytes)
        and isinstance(share.recipient, int)
        and len(share.nonce) == AEAD_NONCE_BYTES
        and len(share.ciphertext) < 1024
    )


class SecureSumServer:
    """The server's part in one secure-sum session.

    Parameters
    ----------
    params:
        The session's parameters (the server draws them with ``SessionParams.new``).
    ledger_keys:
        Each cohort device's registered Ed25519 ledger public key.
    """

    def __init__(self, params: SessionParams, ledger_keys: Mapping[int, str]) -> None:
        self.params = params
        self._digest = params.digest
        self._ledger_keys = dict(ledger_keys)
        self._adverts: dict[int, Advertisement] = {}
        self._graph: dict[int, tuple[int, ...]] | None = None
        self._shares: dict[int, dict[int, EncryptedShare]] = {}
        self._shares_closed = False
        self._masked: dict[int, NDArray[np.uint64]] = {}
        self._excluded: dict[int, str] = {}
        self._request: UnmaskRequest | None = None
        self._replies: dict[int, UnmaskReply] = {}

    # Round 1 ---------------------------------------------------------------------------

    def receive_advertisement(self, advert: Advertisement) -> None:
        """Accept one device's signed advertisement.

        Raises
        ------
        SecureSumError
            If it is for another session, from outside the cohort, a second one from the
            same device, or not signed by that device's registered ledger key.
        """
        if self._graph is not None:
            raise SecureSumError("the roster is closed")
        if advert.session_digest != self._digest:
            raise SecureSumError(f"device {advert.device_id}'s advertisement belongs to another session")
        if advert.device_id not in self.params.cohort:
            raise SecureSumError(f"device {advert.device_id} is not in the cohort")
        if advert.device_id in self._adverts:
            raise SecureSumError(f"device {advert.device_id} advertised twice")
        check_advertisement_keys(advert)
        key = self._ledger_keys.get(advert.device_id)
        if key is None or not verify_signature(key, advert.signed_bytes(), advert.signature):
            raise SecureSumError(f"device {advert.device_id}'s advertisement is not signed by its ledger key")
        self._adverts[advert.device_id] = advert

    def roster(self) -> list[Advertisement]:
        """Close round 1 and return every advertisement, sorted by device (sent to each device).

        Raises
        ------
        SecureSumWithheld
            If fewer than ``min_contributors`` devices advertised.
        """
        if len(self._adverts) < self.params.min_contributors:
            raise SecureSumWithheld(
                f"{len(self._adverts)} devices advertised, fewer than min_contributors {self.params.min_contributors}"
            )
        roster = [self._adverts[d] for d in sorted(self._adverts)]
        if self._graph is None:
            graph = neighbour_map(self.params, roster)
            fewest = min(len(peers) for peers in graph.values())
            if fewest < self.params.threshold:
                raise SecureSumWithheld(
                    f"{len(roster)} devices advertised: {fewest} neighbours cannot hold a threshold of "
                    f"{self.params.threshold}"
                )
            self._graph = graph
        return roster

    def _need_graph(self) -> dict[int, tuple[int, ...]]:
        if self._graph is None:
            raise SecureSumError("the roster is not closed yet")
        return self._graph

    # Round 2 ---------------------------------------------------------------------------

    def receive_shares(self, sender: int, shares: Sequence[EncryptedShare]) -> None:
        """Accept one device's encrypted shares: exactly one to each of its neighbours.

        Raises
        ------
        SecureSumError
            If the sender is not on the roster, already sent shares, or the shares do not
            go one to each of its neighbours.
        """
        graph = self._need_graph()
        if self._shares_closed:
            raise SecureSumError("share collection is closed")
        if sender not in graph:
            raise SecureSumError(f"device {sender} is not on the roster")
        if sender in self._shares:
            raise SecureSumError(f"device {sender} already sent its shares")
        by_recipient: dict[int, EncryptedShare] = {}
        for share in shares:
            if not isinstance(share, EncryptedShare) or not _is_share(share):
                raise SecureSumError(f"device {sender} sent a malformed share")
            if share.sender != sender:
                raise SecureSumError(f"device {sender} sent a share in device {share.sender}'s name")
            if share.recipient in by_recipient:
                raise SecureSumError(f"device {sender} sent two shares to device {share.recipient}")
            by_recipient[share.recipient] = share
        if set(by_recipient) != set(graph[sender]):
            raise SecureSumError(f"device {sender}'s shares do not go one to each of its neighbours")
        self._shares[sender] = by_recipient

    def shares_for(self, recipient: int) -> list[EncryptedShare]:
        """The shares addressed to ``recipient`` by every device that delivered shares.

        The first call closes round 2: every device must mask with the same set of peers
        the server will later account for.
        """
        graph = self._need_graph()
        self._shares_closed = True
        if recipient not in graph:
            raise SecureSumError(f"device {recipient} is not on the roster")
        return [self._shares[s][recipient] for s in sorted(self._shares) if recipient in self._shares[s]]

    # Round 3 ---------------------------------------------------------------------------

    def receive_masked(self, masked: MaskedInput) -> None:
        """Accept one device's masked vector.

        Raises
        ------
        SecureSumError
            If it is for another session, from a device that delivered no shares, repeated,
            of the wrong shape or type, or has values outside ``[0, 2**bits)``.
        """
        if self._request is not None:
            raise SecureSumError("masked-input collection is closed")
        if not isinstance(masked.device_id, int):
            raise SecureSumError("a masked input names no device id")
        if masked.session_digest != self._digest:
            raise SecureSumError(f"device {masked.device_id}'s masked input belongs to another session")
        if masked.device_id not in self._shares:
            raise SecureSumError(f"device {masked.device_id} delivered no shares and cannot contribute")
        if masked.device_id in self._masked:
            raise SecureSumError(f"device {masked.device_id} already sent its masked input")
        if masked.device_id in self._excluded:
            raise SecureSumError(f"device {masked.device_id} was excluded: {self._excluded[masked.device_id]}")
        vector = np.asarray(masked.vector)
        if vector.dtype != np.uint64 or vector.shape != (self.params.length,):
            raise SecureSumError(
                f"device {masked.device_id}'s masked input must be uint64 of length {self.params.length}"
            )
        if vector.size and int(vector.max()) >> self.params.bits:
            raise SecureSumError(f"device {masked.device_id}'s masked input has values outside the modulus")
        self._masked[masked.device_id] = vector

    def exclude(self, device_id: int, reason: str) -> None:
        """Treat a device as dropped before unmasking (e.g. its ledger failed verification).

        Its masked vector is discarded and its pair masks are removed from the survivors' sum
        as for any dropout, so the sum no longer contains its update.
        """
        if self._request is not None:
            raise SecureSumError("the unmask request is already out; exclusions must come before it")
        self._masked.pop(device_id, None)
        self._excluded[device_id] = reason

    @property
    def masked_devices(self) -> tuple[int, ...]:
        """Devices whose masked vectors the server holds (excluded ones are not)."""
        return tuple(sorted(self._masked))

    @property
    def excluded(self) -> Mapping[int, str]:
        """Devices excluded before unmasking, with the reason."""
        return dict(self._excluded)

    # Round 4 ---------------------------------------------------------------------------

    def unmask_request(self) -> UnmaskRequest:
        """Close round 3 and name survivors and dropouts (sent to every survivor).

        Raises
        ------
        SecureSumWithheld
            If fewer than ``min_contributors`` devices survive, or the survivors' masking
            graph is not connected (the server could then sum its parts separately).
        """
        graph = self._need_graph()
        if self._request is not None:
            return self._request
        survivors = tuple(sorted(d for d in self._masked if d not in self._excluded))
        dropped = tuple(sorted(set(self._shares) - set(survivors)))
        if len(survivors) < self.params.min_contributors:
            raise SecureSumWithheld(
                f"{len(survivors)} devices survived, fewer than min_contributors {self.params.min_contributors}"
            )
        if component_size(survivors[0], survivors, graph) != len(survivors):
            raise SecureSumWithheld("the survivors' masking graph is not connected; the sum is withheld")
        self._request = UnmaskRequest(self._digest, survivors, dropped)
        return self._request

    def receive_unmask(self, reply: UnmaskReply) -> None:
        """Accept one survivor's reply; shares are checked when the seeds are recovered.

        Raises
        ------
        SecureSumError
            If no request is out, the reply is for another session, from a non-survivor,
            repeated, or carries shares of devices that are not the replier's neighbours
            or not in the class the request put them in.
        """
        if self._request is None:
            raise SecureSumError("no unmask request is out")
        if reply.session_digest != self._digest:
            raise SecureSumError(f"device {reply.device_id}'s reply belongs to another session")
        if reply.device_id not in self._request.survivors:
            raise SecureSumError(f"device {reply.device_id} is not a survivor")
        if reply.device_id in self._replies:
            raise SecureSumError(f"device {reply.device_id} already replied")
        neighbours = set(self._need_graph()[reply.device_id])
        survivors, dropped = set(self._request.survivors), set(self._request.dropped)
        if not set(reply.seed_shares) <= survivors & neighbours or not set(reply.mask_shares) <= dropped & neighbours:
            raise SecureSumError(f"device {reply.device_id}'s reply carries shares it cannot hold")
        for share in [*reply.seed_shares.values(), *reply.mask_shares.values()]:
            if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
                raise SecureSumError(f"device {reply.device_id}'s reply carries a malformed share")
        self._replies[reply.device_id] = reply

    def _recover(self, owner: int, which: str) -> bytes:
        shares = [
            (reply.seed_shares if which == "seed" else reply.mask_shares)[owner]
            for reply in self._replies.values()
            if owner in (reply.seed_shares if which == "seed" else reply.mask_shares)
        ]
        try:
            distinct = {share_index(s) for s in shares}
        except SecureSumCryptoError as error:
            raise SecureSumError(f"a malformed share of device {owner}'s {which}: {error}") from error
        if len(distinct) < self.params.threshold:
            raise SecureSumWithheld(
                f"{len(distinct)} shares of device {owner}'s {which} arrived, {self.params.threshold} are needed"
            )
        return combine_shares(shares, self.params.threshold)

    def result(self) -> NDArray[np.uint64]:
        """The sum of the survivors' encoded vectors modulo ``2**bits``.

        Raises
        ------
        SecureSumWithheld
            If some seed cannot be recovered from ``threshold`` shares.
        SecureSumError
            If a recovered seed does not match its commitment or advertised key (a corrupt
            share): the masked vectors are not decoded.
        """
        if self._request is None:
            raise SecureSumError("no unmask request is out")
        bits, length = self.params.bits, self.params.length
        modulus_mask = np.uint64((1 << bits) - 1)
        graph = self._need_graph()
        total = np.zeros(length, dtype=np.uint64)
        for device in self._request.survivors:
            total = add_mod(total, self._masked[device], bits)
        for device in self._request.survivors:
            seed = self._recover(device, "seed")
            if commitment(seed) != self._adverts[device].seed_commitment:
                raise SecureSumError(f"device {device}'s recovered seed does not match its commitment")
            total = (total - mask_vector(self_mask_key(seed, self._digest), length, bits)) & modulus_mask
        survivors = set(self._request.survivors)
        for device in self._request.dropped:
            key = mask_agreement_key(self._recover(device, "mask seed"), self._digest)
            if x25519_public_bytes(key) != self._adverts[device].mask_public:
                raise SecureSumError(f"device {device}'s recovered mask key does not match its advertisement")
            for peer in graph[device]:
                if peer not in survivors or peer not in self._shares[device]:
                    continue
                pair = mask_vector(
                    agree(key, self._adverts[peer].mask_public, PAIR_MASK_PURPOSE, self._digest, device, peer),
                    length,
                    bits,
                )
                # The survivor added the pair mask if its id is the lower one, else subtracted it.
                total = (total - pair) & modulus_mask if peer < device else add_mod(total, pair, bits)
        return total

    @property
    def contributors(self) -> tuple[int, ...]:
        """The devices whose vectors are in the sum (after :meth:`unmask_request`)."""
        if self._request is None:
            raise SecureSumError("no unmask request is out")
        return self._request.survivors
