"""A device's privacy ledger: signed, hash-chained records of every DP release.

Each entry states one differentially private release a device made (its DP-SGD
parameters and the device's *cumulative* epsilon afterwards). Entries form a hash
chain per device, and the device signs each entry's hash with its Ed25519 key
(:mod:`shared.privacy.identity`), so a stored ledger can be checked by anyone holding
the device's public key: :func:`verify_chain` names every edit, deletion, reordering
or forgery it finds. This module is pure (no SQL); ``shared.privacy.ledger_store`` and
``server.privacy_store`` persist entries, in tables ``shared.privacy.ledger_table``
derives from :class:`LedgerEntry`'s fields: adding a field to :class:`LedgerEntry` adds
it to the hash, the JSON transport, :func:`make_entry`'s release fields and both tables.

Format
------
:func:`canonical_bytes` is compact JSON (sorted keys, no whitespace, ASCII only) of
every field except ``entry_hash`` and ``signature``. Integer fields are JSON integers,
text fields JSON strings and float fields the string :meth:`float.hex` of the value, so
that every double (``0.1 + 0.2``, ``1e-5``, ``1 / 92``, even ``inf``) round-trips bit
for bit through JSON and SQL and the hash never depends on decimal formatting.
``entry_hash`` is the SHA-256 hex digest of the canonical bytes, and ``signature`` is
the device's Ed25519 signature of the ASCII bytes of that 64-character hex string
(signing the hash rather than the JSON keeps signatures small and lets a verifier
distinguish "contents changed" from "signature invalid").

Chaining: ``seq`` counts a device's entries from 0 and ``prev_hash`` is the previous
entry's ``entry_hash`` (:data:`GENESIS` for seq 0), so removing, inserting or
reordering entries breaks either the seq sequence or a link.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Final, cast

from shared.privacy.identity import DeviceIdentity, verify_signature

# Secure-sum releases (``shared.privacy.accounting.SkellamRelease``); kept here so the ledger
# does not import the accountant.
SKELLAM_MECHANISM: Final = "skellam-secure-sum"

__all__ = [
    "ENTRY_FIELDS",
    "GENESIS",
    "PROBLEM_KINDS",
    "RELEASE_FIELDS",
    "UNITS",
    "ChainProblem",
    "LedgerEntry",
    "canonical_bytes",
    "compute_hash",
    "entry_from_json",
    "entry_to_json",
    "make_entry",
    "verify_chain",
]

GENESIS: Final = "0" * 64

# Privacy unit of a release: one training record, or a user's whole history.
UNITS: Final = ("record", "user")

# Kinds of ChainProblem. The first six come from verify_chain on any stored chain;
# "replayed" (an entry at or before the chain's start, or a seq stored twice) and
# "mismatch" (parameters other than the server asked for) arise when a server checks
# an upload against what it already holds.
PROBLEM_KINDS: Final = ("edited", "deleted", "reordered", "forged", "unsigned", "unknown-key", "replayed", "mismatch")


@dataclass(frozen=True)
class LedgerEntry:
    """One signed DP release of one device.

    No validation happens here on purpose: entries are also built from rows a third
    party may have tampered with, and those must load so :func:`verify_chain` can name
    the tampering. :func:`make_entry` validates what a device signs.

    Attributes
    ----------
    device_id
        The releasing device.
    seq
        Position in the device's ledger: 0, 1, 2, ...
    run
        Name of the run (federation) the release belongs to.
    version
        Global model version the release was trained on; -1 if not applicable.
    task_id
        The server's training task the release answered.
    unit
        Privacy unit: ``"record"`` or ``"user"``.
    mechanism
        E.g. ``"subsampled-gaussian"`` (DP-SGD) or ``"gaussian"``.
    noise_multiplier
        Noise standard deviation divided by ``clip_norm``.
    sample_rate
        Poisson sampling probability per step (1.0 without subsampling).
    steps
        Noisy steps in this release.
    clip_norm
        L2 clipping bound of the per-example (or per-user) contribution.
    accountant
        Accountant that computed ``epsilon``, e.g. ``"rdp"``.
    epsilon
        The device's cumulative epsilon after this release, at ``delta``.
    delta
        The delta ``epsilon`` is stated at.
    timestamp
        When the entry was made, in Unix seconds.
    prev_hash
        ``entry_hash`` of the previous entry; :data:`GENESIS` for seq 0.
    entry_hash
        SHA-256 hex digest of :func:`canonical_bytes` of this entry.
    signature
        The device's Ed25519 signature of ``entry_hash`` (URL-safe base64).
    """

    # Each field's metadata: "comment", what the field holds in a few words (the column
    # comment where entries are stored in SQL), and "length", the most characters a
    # text field holds when more than the default 64.
    device_id: int = field(metadata={"comment": "releasing device"})
    seq: int = field(metadata={"comment": "position in the device's ledger, from 0"})
    run: str = field(metadata={"comment": "run the release belongs to", "length": 255})
    version: int = field(metadata={"comment": "global model version trained on; -1 if not applicable"})
    task_id: int = field(metadata={"comment": "training task the release answered"})
    unit: str = field(metadata={"comment": "privacy unit: record|user"})
    mechanism: str = field(metadata={"comment": "e.g. subsampled-gaussian"})
    noise_multiplier: float = field(metadata={"comment": "noise std / clip_norm"})
    sample_rate: float = field(metadata={"comment": "Poisson sampling probability per step"})
    steps: int = field(metadata={"comment": "noisy steps in this release"})
    clip_norm: float = field(metadata={"comment": "L2 clipping bound"})
    accountant: str = field(metadata={"comment": "accountant of epsilon, e.g. rdp"})
    epsilon: float = field(metadata={"comment": "device's cumulative epsilon after this release"})
    delta: float = field(metadata={"comment": "delta the epsilon is stated at"})
    timestamp: float = field(metadata={"comment": "device's Unix seconds when the entry was made"})
    prev_hash: str = field(metadata={"comment": "entry_hash of the previous entry"})
    entry_hash: str = field(metadata={"comment": "SHA-256 hex of the canonical entry"})
    signature: str = field(metadata={"comment": "device's Ed25519 signature of entry_hash", "length": 128})


# Every field, in declaration order: the one list stores and transports map entries through.
ENTRY_FIELDS: Final = tuple(f.name for f in fields(LedgerEntry))

# The fields a device states about a release (what make_entry takes besides device_id):
# everything but the device and what chaining, hashing and signing derive.
RELEASE_FIELDS: Final = tuple(
    name for name in ENTRY_FIELDS if name not in ("device_id", "seq", "prev_hash", "entry_hash", "signature")
)

# Type of every hashed field, fixing its canonical encoding.
_HASHED_FIELDS: Final[dict[str, type]] = {
    f.name: {"int": int, "float": float, "str": str}[str(f.type)]
    for f in fields(LedgerEntry)
    if f.name not in ("entry_hash", "signature")
}


def _canonical_value(name: str, value: object) -> int | str:
    kind = _HASHED_FIELDS[name]
    if kind is float:
        # numbers.Real rather than float(): float("0.5") would accept text, so a value
        # retyped in a dynamically typed column (SQLite) could hash like the original.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        return float(value).hex()
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be text, got {type(value).__name__}")
    return value


def canonical_bytes(entry_or_fields: LedgerEntry | Mapping[str, object]) -> bytes:
    """Return the deterministic serialisation an entry's hash is computed over.

    Parameters
    ----------
    entry_or_fields
        A :class:`LedgerEntry`, or a mapping holding every field of one
        (``entry_hash`` and ``signature`` may be present and are ignored).

    Returns
    -------
    bytes
        Compact JSON with sorted keys; floats as :meth:`float.hex` strings (see the
        module docstring).

    Raises
    ------
    ValueError
        If a field is missing or an unknown field is given.
    TypeError
        If a field has the wrong type (e.g. text where a number belongs).
    """
    if isinstance(entry_or_fields, LedgerEntry):
        values: Mapping[str, object] = {name: getattr(entry_or_fields, name) for name in _HASHED_FIELDS}
    else:
        values = entry_or_fields
        unknown = set(values) - set(_HASHED_FIELDS) - {"entry_hash", "signature"}
        if unknown:
            raise ValueError(f"unknown ledger fields: {', '.join(sorted(unknown))}")
        missing = set(_HASHED_FIELDS) - set(values)
        if missing:
            raise ValueError(f"missing ledger fields: {', '.join(sorted(missing))}")
    document = {name: _canonical_value(name, values[name]) for name in _HASHED_FIELDS}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def compute_hash(entry_or_fields: LedgerEntry | Mapping[str, object]) -> str:
    """Return the SHA-256 hex digest of :func:`canonical_bytes` (an entry's ``entry_hash``)."""
    return hashlib.sha256(canonical_bytes(entry_or_fields)).hexdigest()


def entry_to_json(entry: LedgerEntry) -> str:
    """Serialise a whole entry (hash and signature included) for transport.

    Same encoding as :func:`canonical_bytes` (floats as :meth:`float.hex`), so the
    receiver gets every value bit for bit and its hash check is meaningful.
    """
    document: dict[str, object] = {name: _canonical_value(name, getattr(entry, name)) for name in _HASHED_FIELDS}
    document["entry_hash"] = entry.entry_hash
    document["signature"] = entry.signature
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_from_json(text: str) -> LedgerEntry:
    """Parse :func:`entry_to_json`'s output, strictly: the text comes from a device.

    The result is not verified; pass it to :func:`verify_chain` (or a server store).

    Raises
    ------
    ValueError
        If ``text`` is not JSON of exactly the ledger's fields with the right types
        (``json.JSONDecodeError`` is a ValueError).
    """
    document = json.loads(text)
    if not isinstance(document, dict):
        raise ValueError("a ledger entry must be a JSON object")
    names = set(_HASHED_FIELDS) | {"entry_hash", "signature"}
    if set(document) != names:
        extra, missing = set(document) - names, names - set(document)
        raise ValueError(f"ledger entry fields differ: unknown {sorted(extra)}, missing {sorted(missing)}")
    values: dict[str, object] = {}
    for name in names:
        value = document[name]
        kind = _HASHED_FIELDS.get(name, str)
        if kind is float:
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a float.hex string, got {type(value).__name__}")
            values[name] = float.fromhex(value)  # ValueError if malformed
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
            values[name] = value
        else:
            if not isinstance(value, str):
                raise ValueError(f"{name} must be text, got {type(value).__name__}")
            values[name] = value
    return LedgerEntry(**values)  # type: ignore[arg-type]


def make_entry(identity: DeviceIdentity, prev: LedgerEntry | None, *, device_id: int, **release: object) -> LedgerEntry:
    """Build the entry after ``prev``, hash it and sign it with ``identity``.

    Parameters
    ----------
    identity
        The device's signing key.
    prev
        The device's current last entry, or None for its first entry.
    device_id
        The releasing device.
    **release
        Every field of :data:`RELEASE_FIELDS` (the release's parameters, its run,
        task, cumulative epsilon and time), as described on :class:`LedgerEntry`.

    Returns
    -------
    LedgerEntry
        With ``seq = prev.seq + 1`` (0 without ``prev``), ``prev_hash = prev.entry_hash``
        (:data:`GENESIS` without ``prev``), its hash and signature.

    Raises
    ------
    ValueError
        If ``prev`` belongs to another device, ``unit`` is unknown, or a number is out of
        range (negative or non-finite parameters, ``delta`` outside [0, 1)).
    TypeError
        If a release field is missing or unknown, or a field has the wrong type.
    """
    missing = [name for name in RELEASE_FIELDS if name not in release]
    unknown = sorted(set(release) - set(RELEASE_FIELDS))
    if missing or unknown:
        raise TypeError(
            "make_entry() takes exactly the release fields: "
            + "; ".join(
                f"{what} {', '.join(names)}" for what, names in (("missing", missing), ("unknown", unknown)) if names
            )
        )
    if prev is not None and prev.device_id != device_id:
        raise ValueError(f"cannot chain an entry of device {device_id} after an entry of device {prev.device_id}")
    unit = release["unit"]
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}; got {unit!r}")
    for name in ("noise_multiplier", "sample_rate", "clip_norm", "epsilon", "steps"):
        value = cast(float, release[name])
        # NaN fails this comparison too; a signed NaN epsilon would be meaningless.
        if not 0 <= value < float("inf"):
            raise ValueError(f"{name} must be finite and non-negative; got {value!r}")
    delta = cast(float, release["delta"])
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1); got {delta!r}")
    values: dict[str, object] = {
        **release,
        "device_id": device_id,
        "seq": 0 if prev is None else prev.seq + 1,
        "prev_hash": GENESIS if prev is None else prev.entry_hash,
    }
    # Normalise types (numpy scalars, ints given for floats) so the entry holds exactly
    # what was hashed; _canonical_value also rejects wrong types.
    typed = {name: _HASHED_FIELDS[name](_check(name, values[name])) for name in _HASHED_FIELDS}
    entry_hash = compute_hash(typed)
    return LedgerEntry(**typed, entry_hash=entry_hash, signature=identity.sign(entry_hash.encode("ascii")))  # type: ignore[arg-type]


def _check(name: str, value: object) -> object:
    _canonical_value(name, value)
    return value


# ---------------------------------------------------------------------- verification


@dataclass(frozen=True)
class ChainProblem:
    """One thing wrong with a device's stored ledger, in words a reviewer understands.

    Attributes
    ----------
    kind
        One of :data:`PROBLEM_KINDS`: ``"edited"`` (contents changed after signing),
        ``"deleted"`` (entries missing), ``"reordered"`` (stored out of seq order),
        ``"forged"`` (hash consistent but not signed by the device's key),
        ``"unsigned"`` (no signature), ``"unknown-key"`` (no key to verify against),
        ``"replayed"`` (an entry the chain already holds, or two entries for one seq),
        ``"mismatch"`` (parameters differ from what the server asked for).
    device_id
        The device whose ledger has the problem (-1 if it cannot be told).
    seq
        The entry concerned (first of a missing range), or None for the whole ledger.
    position
        Index of the entry in the order checked (storage order); for missing entries,
        where they would be. None for the whole ledger.
    detail
        A sentence naming the entry and what is wrong.
    """

    kind: str
    device_id: int
    seq: int | None
    position: int | None
    detail: str


@dataclass
class _Checked:
    """An entry with what verification learnt about it."""

    entry: LedgerEntry
    position: int
    # Hashes this entry may be referred to by: the stored one and, if computable, the
    # recomputed one (an entry edited without fixing its hash is still linked to by its
    # successor through the stored hash; one whose hash column was edited, through the
    # recomputed hash).
    hashes: frozenset[str]
    # Why the entry itself fails, as (kind, reason); None if its hash matches and the
    # device's key signed it, so that its seq and links can be trusted.
    damage: tuple[str, str] | None
    # The seq the entry holds in the chain: its own if intact, else inferred from links.
    seq: int

    @property
    def intact(self) -> bool:
        return self.damage is None

    def label(self) -> str:
        # A damaged entry's stored seq may be the edited field: say both.
        claims = "" if self.entry.seq == self.seq else f" as seq {self.entry.seq}"
        return f"entry seq {self.seq} (task {self.entry.task_id}, stored at position {self.position}{claims})"


def _seq_ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Group sorted integers into inclusive runs of consecutive values."""
    ranges: list[tuple[int, int]] = []
    for s in seqs:
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], s)
        else:
            ranges.append((s, s))
    return ranges


def _range_text(first: int, last: int) -> str:
    return f"entry seq {first} is" if first == last else f"entries seq {first}-{last} ({last - first + 1}) are"


def verify_chain(
    entries: Sequence[LedgerEntry],
    public_key: str | None,
    *,
    start_prev_hash: str = GENESIS,
    start_seq: int = 0,
    expected_count: int | None = None,
    device_id: int | None = None,
) -> list[ChainProblem]:
    """Check one device's stored ledger and name everything wrong with it.

    Parameters
    ----------
    entries
        One device's entries in STORAGE order (e.g. by the database's row id), not
        sorted by seq: sorting would hide reordering.
    public_key
        The device's registered public key; None if it has none.
    start_prev_hash, start_seq
        Where ``entries`` must continue from: the defaults for a whole ledger, or a
        stored head's ``entry_hash`` and ``seq + 1`` for a new upload.
    expected_count
        How many entries there should be (from ``start_seq``), if known. Deleting the
        last entries leaves a chain that is valid on its own; only a count kept
        elsewhere reveals it.
    device_id
        The device being checked; by default the device most entries name.

    Returns
    -------
    list[ChainProblem]
        Empty if the ledger is intact; otherwise ordered by position. Each single
        tampering is reported once, with its own kind: a changed field -> ``"edited"``;
        a changed field with a recomputed hash, or a signature by another key ->
        ``"forged"``; a blanked signature -> ``"unsigned"``; a removed entry or range ->
        ``"deleted"``; rows swapped or moved -> ``"reordered"`` (one problem naming all
        misplaced seqs); entries before ``start_seq`` or two entries for one seq ->
        ``"replayed"``; no key -> a single ``"unknown-key"`` and nothing else (nothing
        else can be checked without the key).

    Notes
    -----
    Entries that fail their own hash or signature check are reported for that alone:
    their seq and links cannot be trusted, so they are given the seq their intact
    neighbours' links imply and are left out of the link and order checks, which would
    otherwise report a second, derived problem (e.g. the successor of a re-hashed entry
    no longer links to it).
    """
    if device_id is None:
        device_id = Counter(e.device_id for e in entries).most_common(1)[0][0] if entries else -1
    if public_key is None:
        if not entries and not expected_count:
            return []
        return [
            ChainProblem(
                "unknown-key",
                device_id,
                None,
                None,
                f"device {device_id} has no registered public key, so none of its {len(entries)} ledger entries "
                "can be verified",
            )
        ]

    problems: list[ChainProblem] = []
    checked = [_check_entry(entry, position, public_key) for position, entry in enumerate(entries)]
    _infer_seqs(checked, start_prev_hash, start_seq)
    for c in checked:
        if c.damage is not None:
            kind, reason = c.damage
            problems.append(ChainProblem(kind, device_id, c.seq, c.position, f"{c.label()} {reason}"))
    intact = [c for c in checked if c.intact]
    by_seq = _replays(intact, start_seq, device_id, problems)
    _gaps(checked, start_seq, expected_count, device_id, problems)
    _links(intact, by_seq, start_prev_hash, start_seq, device_id, problems)
    _order(intact, device_id, problems)
    return sorted(problems, key=lambda p: -1 if p.position is None else p.position)


def _check_entry(entry: LedgerEntry, position: int, public_key: str) -> _Checked:
    """Check one entry's own hash and signature."""
    try:
        recomputed: str | None = compute_hash(entry)
    except (TypeError, ValueError) as exc:
        # A value of the wrong type can only come from editing the stored row.
        recomputed = None
        edited_reason = f"holds a malformed value ({exc})"
    else:
        edited_reason = "no longer matches the hash it was signed with: a field was changed after signing"
    damage: tuple[str, str] | None = None
    if recomputed != entry.entry_hash:
        damage = ("edited", edited_reason)
    elif not entry.signature:
        damage = ("unsigned", "has no signature")
    elif not verify_signature(public_key, entry.entry_hash.encode("ascii"), entry.signature):
        damage = (
            "forged",
            "has a consistent hash but a signature not made by the device's key: "
            "it was re-hashed after an edit or signed by someone else",
        )
    return _Checked(
        entry=entry,
        position=position,
        hashes=frozenset(h for h in (entry.entry_hash, recomputed) if h is not None),
        damage=damage,
        seq=entry.seq if isinstance(entry.seq, int) else -1,
    )


def _infer_seqs(checked: list[_Checked], start_prev_hash: str, start_seq: int) -> None:
    """Give each damaged entry the seq its intact neighbours' links imply.

    Its own ``seq`` may be the edited field; its slot still must not read as deleted.
    """
    successor_of: dict[str, _Checked] = {}
    by_hash: dict[str, _Checked] = {}
    for c in checked:
        if c.intact:
            successor_of.setdefault(c.entry.prev_hash, c)
            by_hash.setdefault(c.entry.entry_hash, c)
    for c in checked:
        if c.intact:
            continue
        successors = [successor_of[h] for h in c.hashes if h in successor_of]
        if successors:
            c.seq = successors[0].seq - 1
        elif c.entry.prev_hash in by_hash:
            c.seq = by_hash[c.entry.prev_hash].seq + 1
        elif c.entry.prev_hash == start_prev_hash:
            c.seq = start_seq


def _replays(
    intact: list[_Checked], start_seq: int, device_id: int, problems: list[ChainProblem]
) -> dict[int, _Checked]:
    """Report entries before the chain's start and seqs held twice; map seq -> first entry."""
    by_seq: dict[int, _Checked] = {}
    for c in intact:
        label = c.label()
        if c.seq < start_seq:
            problems.append(
                ChainProblem(
                    "replayed",
                    device_id,
                    c.seq,
                    c.position,
                    f"{label} repeats an entry the chain already holds: it should continue at seq {start_seq}",
                )
            )
        elif c.seq in by_seq:
            first = by_seq[c.seq]
            same = first.entry.entry_hash == c.entry.entry_hash
            what = (
                f"is a copy of the entry stored at position {first.position}"
                if same
                else f"differs from the entry for the same seq stored at position {first.position}: "
                "the device signed two versions of it (the chain forked)"
            )
            problems.append(ChainProblem("replayed", device_id, c.seq, c.position, f"{label} {what}"))
        else:
            by_seq[c.seq] = c
    return by_seq


def _gaps(
    checked: list[_Checked],
    start_seq: int,
    expected_count: int | None,
    device_id: int,
    problems: list[ChainProblem],
) -> None:
    """Report missing seqs: gaps in the middle, and a short tail if a count is known."""
    # Damaged entries occupy their slot: they are reported, but not as deleted.
    present = {c.seq for c in checked if c.seq >= start_seq}
    stored_last = max(present, default=start_seq - 1)
    last = stored_last
    if expected_count is not None:
        last = max(last, start_seq + expected_count - 1)
    missing = sorted(set(range(start_seq, last + 1)) - present)
    for first, final in _seq_ranges(missing):
        position = sum(1 for c in checked if c.seq < first)
        if first > stored_last:
            detail = (
                f"{_range_text(first, final)} missing at the end: {expected_count} entries expected from seq "
                f"{start_seq}, {len(present)} stored"
            )
        elif first == start_seq:
            detail = f"{_range_text(first, final)} missing at the start: the stored chain begins at seq {final + 1}"
        else:
            detail = (
                f"{_range_text(first, final)} missing: seq {first - 1} and seq {final + 1} are stored "
                "but nothing between them"
            )
        problems.append(ChainProblem("deleted", device_id, first, position, detail))


def _links(
    intact: list[_Checked],
    by_seq: dict[int, _Checked],
    start_prev_hash: str,
    start_seq: int,
    device_id: int,
    problems: list[ChainProblem],
) -> None:
    """Report intact entries whose prev_hash points at no stored entry.

    Only links between two intact entries are judged: a missing predecessor is already
    reported as a gap, a damaged one as edited/forged/unsigned.
    """
    for s, c in by_seq.items():
        label = c.label()
        if s == start_seq:
            if c.entry.prev_hash != start_prev_hash:
                where = "the genesis hash" if start_prev_hash == GENESIS else f"the head {start_prev_hash[:12]}..."
                problems.append(
                    ChainProblem(
                        "deleted",
                        device_id,
                        s,
                        c.position,
                        f"{label} links to {c.entry.prev_hash[:12]}..., not to {where}: the entry it was chained to "
                        "is not stored",
                    )
                )
            continue
        pred = by_seq.get(s - 1)
        if pred is not None and c.entry.prev_hash not in pred.hashes:
            problems.append(
                ChainProblem(
                    "deleted",
                    device_id,
                    s,
                    c.position,
                    f"{label} links to {c.entry.prev_hash[:12]}..., not to the stored entry seq {s - 1} "
                    f"({pred.entry.entry_hash[:12]}...): the entry it was chained to is not stored (the chain forked)",
                )
            )


def _order(intact: list[_Checked], device_id: int, problems: list[ChainProblem]) -> None:
    """Report intact entries stored out of seq order, as one problem naming them all."""
    stored = [c.seq for c in intact]
    ordered = sorted(stored)
    misplaced = [c for c, want in zip(intact, ordered, strict=True) if c.seq != want]
    if not misplaced:
        return
    first = misplaced[0]
    listing = ", ".join(f"seq {c.seq} at position {c.position}" for c in misplaced)
    problems.append(
        ChainProblem(
            "reordered",
            device_id,
            first.seq,
            first.position,
            f"{len(misplaced)} entries are stored out of seq order ({listing}): rows were swapped or moved",
        )
    )


def record_histories(
    entries: Sequence[LedgerEntry],
) -> tuple[list[tuple[float, float, int]], list[tuple[float, float, int, float]]]:
    """A device's record-level releases as its accountant keeps them: (Gaussian, Skellam).

    Gaussian entries (DP-SGD, private evaluation) are ``(noise_multiplier, sample_rate,
    steps)``; secure-sum entries (mechanism :data:`SKELLAM_MECHANISM`) add their integer L2
    sensitivity, which their ``clip_norm`` field carries.
    """
    gaussian: list[tuple[float, float, int]] = []
    skellam: list[tuple[float, float, int, float]] = []
    for e in entries:
        if e.unit != "record":
            continue
        if e.mechanism == SKELLAM_MECHANISM:
            skellam.append((e.noise_multiplier, e.sample_rate, e.steps, e.clip_norm))
        else:
            gaussian.append((e.noise_multiplier, e.sample_rate, e.steps))
    return gaussian, skellam
