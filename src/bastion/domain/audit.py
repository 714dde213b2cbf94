"""The tamper-evident audit chain: canonical bytes, HMAC chaining, signed checkpoints, verification, previews.

Each event's hash is ``HMAC(chain_key, prev_hash + "\\n" + canonical(seq, event))``, so editing, deleting,
inserting or reordering rows breaks a link that cannot be repaired without the key. A MAC'd head record catches
truncation of the newest rows; checkpoints signed with a separate key and kept outside the database catch it even
when the head is rolled back, and let verification start after rows older than the newest checkpoint are pruned.
"""

from __future__ import annotations

import hmac
import json
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from hashlib import sha256
from typing import Final

from bastion.domain import credentials
from bastion.errors import ValidationFailed
from bastion.types import JSONObject, JSONScalar, JSONValue

__all__ = [
    "GENESIS",
    "PREVIEW_MAX_CHARS",
    "AuditEvent",
    "Break",
    "Checkpoint",
    "SealedEvent",
    "TamperKind",
    "Verdict",
    "arguments_hmac",
    "canonical",
    "chain_hash",
    "checkpoint_valid",
    "derive_key",
    "head_mac",
    "preview",
    "seal",
    "sign_checkpoint",
    "verify",
]

GENESIS: Final = "0" * 64
PREVIEW_MAX_CHARS: Final = 512
_KEY_LABEL: Final = b"bastion/audit/v1/"
# How far verify looks ahead for the row a misplaced row links to: bounds its memory on any length of log.
_LOOKAHEAD_ROWS: Final = 10_000
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_CHECKPOINT_FIELDS: Final = frozenset({"seq", "hash", "created_at", "signature"})


def derive_key(audit_key: bytes, purpose: str) -> bytes:
    """The key for one purpose ("chain", "checkpoint", "arguments"): no two uses of the audit key share a key."""
    return hmac.new(audit_key, _KEY_LABEL + purpose.encode("utf-8"), sha256).digest()


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: str
    occurred_at: datetime  # aware UTC
    kind: str  # "mcp" or "admin"
    method: str  # MCP method ("tools/call", "http" for refusals) or admin action ("host.disabled")
    outcome: str  # "ok", "error", "refused", "denied", "limited", "blocked", "interrupted", "pending"
    workspace: str | None = None
    correlation_id: str | None = None
    member_id: str | None = None
    actor: str | None = None  # email or label of who acted
    host_id: str | None = None
    token_id: str | None = None
    gateway: str | None = None
    server: str | None = None
    name: str | None = None  # tool name, prompt name or resource URI
    target: str | None = None  # admin: "host:<id>" etc.
    decision: str | None = None  # "allow" / "deny"
    reason: str | None = None
    upstream_status: str | None = None
    latency_us: int | None = None
    args_hmac: str | None = None
    args_preview: str | None = None
    detail: JSONObject | None = None


# Read once: `dataclasses.fields` on every hash was 2-3 % of a relayed call's CPU.
_EVENT_FIELDS: Final = tuple(field.name for field in fields(AuditEvent))


@dataclass(frozen=True, slots=True)
class SealedEvent:
    seq: int
    prev_hash: str
    hash: str
    event: AuditEvent


def _bytes(text: str) -> bytes:
    # surrogatepass: a lone surrogate from a JSON-RPC string must not make hashing (and so the call) fail.
    return text.encode("utf-8", "surrogatepass")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(_bytes(a), _bytes(b))


def _json_bytes(value: object) -> bytes:
    return _bytes(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def _as_utc(moment: datetime) -> datetime:
    # A naive value is read as UTC: SQLite hands datetimes back without a zone.
    return moment.replace(tzinfo=UTC) if moment.utcoffset() is None else moment.astimezone(UTC)


def _utc_iso(moment: datetime) -> str:
    """ISO 8601 in UTC, always with six fractional digits and "Z": one spelling per instant."""
    return _as_utc(moment).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical(seq: int, event: AuditEvent) -> bytes:
    """The bytes an event is hashed over: compact sorted-key UTF-8 JSON of ``seq`` and every field."""
    record: dict[str, object] = {name: getattr(event, name) for name in _EVENT_FIELDS}
    record["occurred_at"] = _utc_iso(event.occurred_at)
    record["seq"] = seq
    return _json_bytes(record)


def chain_hash(chain_key: bytes, prev_hash: str, seq: int, event: AuditEvent) -> str:
    return hmac.new(chain_key, _bytes(prev_hash) + b"\n" + canonical(seq, event), sha256).hexdigest()


def head_mac(chain_key: bytes, seq: int, hash_: str) -> str:
    return hmac.new(chain_key, _bytes(f"head|{seq}|{hash_}"), sha256).hexdigest()


def seal(chain_key: bytes, prev_seq: int, prev_hash: str, events: Sequence[AuditEvent]) -> list[SealedEvent]:
    """Number ``events`` from ``prev_seq + 1`` and chain each to the one before.

    Raises:
        ValidationFailed: ``prev_seq``/``prev_hash`` are not a possible chain end.
    """
    if prev_seq < 0 or not _HEX64.fullmatch(prev_hash) or (prev_seq == 0 and prev_hash != GENESIS):
        raise ValidationFailed(f"cannot continue the audit chain after event {prev_seq} with hash {prev_hash!r}")
    sealed: list[SealedEvent] = []
    for seq, event in enumerate(events, start=prev_seq + 1):
        hash_ = chain_hash(chain_key, prev_hash, seq, event)
        sealed.append(SealedEvent(seq=seq, prev_hash=prev_hash, hash=hash_, event=event))
        prev_hash = hash_
    return sealed


# --- Checkpoints ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement that event ``seq`` had ``hash``; exported, it outlives the database rows."""

    seq: int
    hash: str
    created_at: datetime
    signature: str

    def to_json(self) -> JSONObject:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "created_at": _utc_iso(self.created_at),
            "signature": self.signature,
        }

    @classmethod
    def from_json(cls, data: JSONValue) -> Checkpoint:
        """Read what ``to_json`` wrote. The signature is checked by ``checkpoint_valid``, not here.

        Raises:
            ValidationFailed: not an object with exactly the four fields, each well-formed.
        """
        if not isinstance(data, dict) or _CHECKPOINT_FIELDS.symmetric_difference(data):
            raise ValidationFailed("a checkpoint is an object with exactly seq, hash, created_at and signature")
        seq, hash_, created, signature = data["seq"], data["hash"], data["created_at"], data["signature"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValidationFailed("a checkpoint's seq must be a positive integer", field="seq")
        if not isinstance(hash_, str) or not _HEX64.fullmatch(hash_):
            raise ValidationFailed("a checkpoint's hash must be 64 lowercase hex digits", field="hash")
        if not isinstance(signature, str) or not _HEX64.fullmatch(signature):
            raise ValidationFailed("a checkpoint's signature must be 64 lowercase hex digits", field="signature")
        try:
            created_at = datetime.fromisoformat(created) if isinstance(created, str) else None
        except ValueError:
            created_at = None
        if created_at is None or created_at.utcoffset() is None:
            raise ValidationFailed("a checkpoint's created_at must be an ISO 8601 time with a zone", field="created_at")
        return cls(seq=seq, hash=hash_, created_at=created_at.astimezone(UTC), signature=signature)


def _checkpoint_signature(checkpoint_key: bytes, seq: int, hash_: str, created_at: datetime) -> str:
    message = f"checkpoint|{seq}|{hash_}|{_utc_iso(created_at)}"
    return hmac.new(checkpoint_key, _bytes(message), sha256).hexdigest()


def sign_checkpoint(checkpoint_key: bytes, seq: int, hash_: str, created_at: datetime) -> Checkpoint:
    """Raises: ValidationFailed: ``seq`` is not positive or ``hash_`` is not a chain hash."""
    if seq < 1 or not _HEX64.fullmatch(hash_):
        raise ValidationFailed(f"cannot checkpoint event {seq} with hash {hash_!r}")
    created_at = _as_utc(created_at)
    signature = _checkpoint_signature(checkpoint_key, seq, hash_, created_at)
    return Checkpoint(seq=seq, hash=hash_, created_at=created_at, signature=signature)


def checkpoint_valid(checkpoint_key: bytes, checkpoint: Checkpoint) -> bool:
    expected = _checkpoint_signature(checkpoint_key, checkpoint.seq, checkpoint.hash, checkpoint.created_at)
    return _same(expected, checkpoint.signature)


# --- Verification ---------------------------------------------------------------------------------------------


class TamperKind(StrEnum):
    ALTERED = "altered"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    BAD_CHECKPOINT = "bad_checkpoint"


@dataclass(frozen=True, slots=True)
class Break:
    kind: TamperKind
    seq: int
    detail: str  # a sentence for people: "event 42 was altered (its content does not match its hash)"


@dataclass(frozen=True, slots=True)
class Verdict:
    """``checked`` events verified intact, from ``first_seq`` to ``last_seq``; ``broken`` is the first break."""

    checked: int
    first_seq: int | None
    last_seq: int | None
    broken: Break | None

    @property
    def ok(self) -> bool:
        return self.broken is None


class _Window:
    """The rows not yet verified, read ahead up to a bound, with a count of their hashes."""

    __slots__ = ("_hashes", "_rows", "_size", "_source")

    def __init__(self, source: Iterator[SealedEvent], size: int) -> None:
        self._source = source
        self._size = max(size, 1)
        self._rows: deque[SealedEvent] = deque()
        self._hashes: Counter[str] = Counter()
        self._fill()

    def _fill(self) -> None:
        while len(self._rows) < self._size and (row := next(self._source, None)) is not None:
            self._rows.append(row)
            self._hashes[row.hash] += 1

    def peek(self) -> SealedEvent | None:
        return self._rows[0] if self._rows else None

    def pop(self) -> SealedEvent | None:
        if not self._rows:
            return None
        row = self._rows.popleft()
        self._hashes[row.hash] -= 1
        if not self._hashes[row.hash]:
            del self._hashes[row.hash]
        self._fill()
        return row

    def holds_hash(self, hash_: str) -> bool:
        return hash_ in self._hashes


def _classify(chain_key: bytes, row: SealedEvent, seq: int, prev: str, ahead: _Window) -> Break | None:
    """Why ``row``, expected to be event ``seq`` linking to ``prev``, breaks the chain; None when it does not."""
    if row.seq < seq:
        return Break(TamperKind.INSERTED, row.seq, f"event {row.seq} appears more than once (one copy was inserted)")
    if row.seq > seq:
        return Break(TamperKind.DELETED, seq, f"event {seq} was deleted (the log jumps from {seq - 1} to {row.seq})")
    following = ahead.peek()
    skipping_repairs = following is not None and _same(following.prev_hash, prev)
    if not _same(row.prev_hash, prev):
        if ahead.holds_hash(row.prev_hash):
            return Break(
                TamperKind.REORDERED, seq, f"events were reordered at {seq} (event {seq} links to a later one)"
            )
        if skipping_repairs:
            return Break(TamperKind.INSERTED, seq, f"a forged event was inserted at {seq}")
        if _same(chain_hash(chain_key, row.prev_hash, seq + 1, row.event), row.hash):
            return Break(TamperKind.DELETED, seq, f"event {seq} was deleted (the events after it were renumbered)")
        return Break(TamperKind.ALTERED, seq, f"event {seq} was altered (it does not link to the event before it)")
    if not _same(chain_hash(chain_key, prev, seq, row.event), row.hash):
        if skipping_repairs:
            return Break(TamperKind.INSERTED, seq, f"a forged event was inserted at {seq}")
        return Break(TamperKind.ALTERED, seq, f"event {seq} was altered (its content does not match its hash)")
    return None


def _signed(checkpoint_key: bytes, checkpoints: Sequence[Checkpoint]) -> dict[int, str] | Break:
    """The hash each validly signed checkpoint vouches for, by seq; or the first checkpoint that cannot be trusted."""
    signed: dict[int, str] = {}
    for checkpoint in sorted(checkpoints, key=lambda c: c.seq):
        seq = checkpoint.seq
        if not checkpoint_valid(checkpoint_key, checkpoint):
            return Break(TamperKind.BAD_CHECKPOINT, seq, f"the checkpoint for event {seq} has an invalid signature")
        if not _same(signed.setdefault(seq, checkpoint.hash), checkpoint.hash):
            return Break(TamperKind.BAD_CHECKPOINT, seq, f"two signed checkpoints disagree about event {seq}")
    return signed


def verify(
    events: Iterable[SealedEvent],
    *,
    chain_key: bytes,
    checkpoint_key: bytes,
    head: tuple[int, str, str] | None,
    checkpoints: Sequence[Checkpoint] = (),
) -> Verdict:
    """Walk ``events`` (ascending seq, as stored) and report the first break in the chain, the head or a checkpoint.

    Args:
        events: the stored rows; they may start after a checkpoint when older rows were pruned.
        head: the stored head record as ``(seq, hash, mac)``, or None when there is none to check.
        checkpoints: signed checkpoints, ideally the exported copies kept outside the database.
    """
    signed = _signed(checkpoint_key, checkpoints)
    if isinstance(signed, Break):
        return Verdict(checked=0, first_seq=None, last_seq=None, broken=signed)
    trusted_head = head if head is not None and _same(head_mac(chain_key, head[0], head[1]), head[2]) else None
    ahead = _Window(iter(events), _LOOKAHEAD_ROWS)
    first = ahead.peek()
    first_seq = first.seq if first is not None else None

    # Where the chain starts: genesis, or the signed checkpoint just before the oldest row kept after pruning.
    seq, prev = 0, GENESIS
    if first is None:
        # No rows at all: legitimate only when pruning stopped at a checkpoint that the head still points at.
        at_head = signed.get(trusted_head[0]) if trusted_head is not None else None
        if trusted_head is not None and at_head is not None and _same(at_head, trusted_head[1]):
            seq, prev = trusted_head[0], at_head
    elif first.seq > 1:
        if first.seq - 1 not in signed:
            missing = max((s + 1 for s in signed if s < first.seq - 1), default=1)
            detail = f"event {missing} was deleted (the log starts at {first.seq} and no checkpoint covers the gap)"
            return Verdict(
                checked=0, first_seq=first_seq, last_seq=None, broken=Break(TamperKind.DELETED, missing, detail)
            )
        seq, prev = first.seq - 1, signed[first.seq - 1]

    checked = 0
    while (row := ahead.pop()) is not None:
        broken = _classify(chain_key, row, seq + 1, prev, ahead)
        if broken is None and not _same(signed.get(row.seq, row.hash), row.hash):
            broken = Break(TamperKind.ALTERED, row.seq, f"event {row.seq} was altered (it differs from its checkpoint)")
        if broken is not None:
            if trusted_head is not None and seq + 1 > trusted_head[0]:
                head_seq = trusted_head[0]
                detail = f"events after the chain head ({head_seq}) were inserted"
                broken = Break(TamperKind.INSERTED, head_seq + 1, detail)
            return Verdict(checked, first_seq, seq if checked else None, broken)
        checked += 1
        seq, prev = row.seq, row.hash

    end = _end(seq, prev, head, trusted_head is not None, signed)
    return Verdict(checked, first_seq, seq if checked else None, end)


def _end(
    last: int, last_hash: str, head: tuple[int, str, str] | None, head_ok: bool, signed: dict[int, str]
) -> Break | None:
    """What the head record and the checkpoints say about the end of an intact chain ending at ``last``."""
    if head is not None:
        head_seq = head[0]
        if not head_ok:
            return Break(TamperKind.ALTERED, head_seq, "the chain head record was altered (its MAC does not match)")
        if head_seq > last:
            detail = f"events from {last + 1} on were deleted (the chain head records event {head_seq})"
            return Break(TamperKind.TRUNCATED, last + 1, detail)
        if head_seq < last:
            return Break(TamperKind.INSERTED, head_seq + 1, f"events after the chain head ({head_seq}) were inserted")
        if not _same(head[1], last_hash):
            return Break(TamperKind.ALTERED, last, f"event {last} was altered (it does not match the chain head)")
    beyond = [s for s in signed if s > last]
    if beyond:
        detail = f"events from {last + 1} on were deleted (a signed checkpoint covers event {max(beyond)})"
        return Break(TamperKind.TRUNCATED, last + 1, detail)
    return None


# --- Arguments: a keyed digest and a bounded, redacted preview --------------------------------------------------


def arguments_hmac(arguments_key: bytes, arguments: JSONValue) -> str:
    """A digest that tells whether two calls had the same arguments without storing them."""
    return hmac.new(arguments_key, _json_bytes(arguments), sha256).hexdigest()


_REDACTED: Final = "[REDACTED]"
_REDACTED_JSON: Final = json.dumps(_REDACTED)
_ELLIPSIS: Final = "…"
# Strings longer than this are judged on their first characters only: the preview shows far fewer of them.
_SCAN_MAX_CHARS: Final = 64 * 1024
_SECRET_KEY_WORDS: Final = tuple(
    re.sub(r"[^a-z0-9]", "", word)
    for word in (
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "authorization",
        "auth",
        "cookie",
        "credential",
        "private_key",
        "session",
    )
)
_CREDENTIAL_PREFIXES: Final = ("bst_", "bsk_", "bsl_", "whsec_", "sk-", "ghp_", "xox")
_AUTH_SCHEME_RE: Final = re.compile(r"(?:bearer|basic)\s", re.IGNORECASE)
# Every JWT header is base64url of '{"', hence "eyJ"; other dotted triples count only with long segments.
_JWT_RE: Final = re.compile(r"eyJ[\w-]*(?:\.[\w-]*){2,4}|[\w-]{16,}(?:\.[\w-]{16,}){2,4}", re.ASCII)
_OPAQUE_RE: Final = re.compile(r"[A-Za-z0-9+/_=-]{32,}")
# Known token shapes inside longer text ("use bst_… for this"), each replaced on its own.
_EMBEDDED_RE: Final = re.compile(
    r"(?<![A-Za-z0-9])(?:bst_|bsk_|bsl_|whsec_|ghp_|gho_|ghu_|ghs_|ghr_|github_pat_|glpat-|xox[a-z]-|sk-)"
    r"[A-Za-z0-9+/=_-]{8,}"
    r"|(?i:bearer|basic)\s+[A-Za-z0-9+/=._~-]{8,}"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
)


def _secret_key(key: str) -> bool:
    squashed = re.sub(r"[^a-z0-9]", "", key.lower())
    return any(word in squashed for word in _SECRET_KEY_WORDS)


def _credential_shape(text: str) -> bool:
    text = text.strip()
    return (
        text.startswith(_CREDENTIAL_PREFIXES)
        or _AUTH_SCHEME_RE.match(text) is not None
        or _JWT_RE.fullmatch(text) is not None
    )


def _credential(text: str) -> bool:
    stripped = text.strip()
    return (
        _credential_shape(stripped)
        or _OPAQUE_RE.fullmatch(stripped) is not None
        or credentials.credential_value(stripped)
    )


def _string(text: str, *, key: bool = False) -> str:
    text = text[:_SCAN_MAX_CHARS]
    # A key is only judged by token shapes: a long setting name is not a secret, a long value may be.
    whole = _credential_shape(text) if key else _credential(text)
    shown = _REDACTED if whole else _EMBEDDED_RE.sub(_REDACTED, text)
    # Lone surrogates become their \u escapes, so the preview is valid UTF-8 for any database.
    return json.dumps(shown, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


def _scalar(value: JSONScalar) -> str:
    if isinstance(value, str):
        return _string(value)
    if value is None or isinstance(value, bool | float):
        return json.dumps(value)
    try:
        return str(value)
    except ValueError:  # more digits than Python will turn into text
        return _string("<integer too long to show>")


@dataclass(frozen=True, slots=True)
class _Nested:
    value: JSONValue


def _pieces(value: JSONValue) -> Iterator[str | _Nested]:
    """The text of one value, with the values inside it left for the caller (no recursion, any depth)."""
    if isinstance(value, dict):
        yield "{"
        for index, (key, item) in enumerate(value.items()):
            yield ("," if index else "") + _string(str(key), key=True) + ":"
            yield _REDACTED_JSON if _secret_key(str(key)) else _Nested(item)
        yield "}"
    elif isinstance(value, list):
        yield "["
        for index, item in enumerate(value):
            if index:
                yield ","
            yield _Nested(item)
        yield "]"
    else:
        yield _scalar(value)


def preview(arguments: JSONValue, limit: int = PREVIEW_MAX_CHARS) -> str:
    """Compact JSON of ``arguments`` with secrets redacted, at most ``limit`` characters ("…" marks a cut)."""
    if limit < 1:
        return ""
    parts: list[str] = []
    size = 0
    stack = [_pieces(arguments)]
    while stack and size <= limit:  # stop reading once the cut is certain: cost is bounded by the limit
        piece = next(stack[-1], None)
        if piece is None:
            stack.pop()
        elif isinstance(piece, _Nested):
            stack.append(_pieces(piece.value))
        else:
            parts.append(piece)
            size += len(piece)
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + _ELLIPSIS
