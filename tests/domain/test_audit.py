"""The audit chain finds the first tampered event; previews never carry secrets (SECURITY-CHECKLIST 25, 27, 28)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from collections.abc import Iterator
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bastion.domain import audit
from bastion.domain.audit import (
    GENESIS,
    PREVIEW_MAX_CHARS,
    AuditEvent,
    Checkpoint,
    SealedEvent,
    TamperKind,
    Verdict,
    arguments_hmac,
    canonical,
    chain_hash,
    checkpoint_valid,
    derive_key,
    head_mac,
    preview,
    seal,
    sign_checkpoint,
    verify,
)
from bastion.errors import ValidationFailed
from bastion.types import JSONValue

AUDIT_KEY = b"test-audit-key-0123456789abcdefghij"
CHAIN_KEY = derive_key(AUDIT_KEY, "chain")
CHECKPOINT_KEY = derive_key(AUDIT_KEY, "checkpoint")
ARGUMENTS_KEY = derive_key(AUDIT_KEY, "arguments")
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
N = 20

Head = tuple[int, str, str]

json_values: st.SearchStrategy[JSONValue] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=4)
optional_text = st.none() | st.text()
FIELD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "id": st.text(),
    "occurred_at": st.datetimes(timezones=st.just(UTC)),
    "kind": st.text(),
    "method": st.text(),
    "outcome": st.text(),
    "latency_us": st.none() | st.integers(),
    "detail": st.none() | json_objects,
}
events = st.builds(
    AuditEvent,
    id=st.text(),
    occurred_at=st.datetimes(timezones=st.just(UTC)),
    kind=st.sampled_from(["mcp", "admin"]),
    method=st.text(),
    outcome=st.text(),
    name=optional_text,
    latency_us=st.none() | st.integers(min_value=0),
    args_preview=optional_text,
    detail=st.none() | json_objects,
)


def event(i: int) -> AuditEvent:
    return AuditEvent(
        id=f"evt_{i:04d}",
        occurred_at=T0 + timedelta(seconds=i, microseconds=i),
        kind="mcp" if i % 3 else "admin",
        method="tools/call" if i % 3 else "host.disabled",
        outcome="ok" if i % 4 else "denied",
        workspace="ws_1",
        correlation_id=f"req-{i}",
        member_id="mem_1",
        actor="ada@example.com",
        host_id="host_1",
        token_id="tok_1",
        gateway="main",
        server="github",
        name="search_issues",
        target=None if i % 3 else "host:host_1",
        decision="allow",
        reason="rule r1",
        upstream_status="200",
        latency_us=1000 + i,
        args_hmac="ab" * 32,
        args_preview='{"q":"bug"}',
        detail={"attempt": i, "ratio": 0.5, "tags": ["a", "ü"]},
    )


def chain(n: int = N) -> list[SealedEvent]:
    return seal(CHAIN_KEY, 0, GENESIS, [event(i) for i in range(1, n + 1)])


def head_of(rows: list[SealedEvent]) -> Head:
    last = rows[-1]
    return last.seq, last.hash, head_mac(CHAIN_KEY, last.seq, last.hash)


def checkpoint_at(rows: list[SealedEvent], seq: int) -> Checkpoint:
    return sign_checkpoint(CHECKPOINT_KEY, seq, rows[seq - 1].hash, T0 + timedelta(hours=1))


def check(rows: list[SealedEvent], head: Head | None, checkpoints: tuple[Checkpoint, ...] = ()) -> Verdict:
    return verify(rows, chain_key=CHAIN_KEY, checkpoint_key=CHECKPOINT_KEY, head=head, checkpoints=checkpoints)


def broken(verdict: Verdict) -> tuple[TamperKind, int]:
    assert verdict.broken is not None, "tampering went unnoticed"
    return verdict.broken.kind, verdict.broken.seq


def renumbered(rows: list[SealedEvent]) -> list[SealedEvent]:
    """What an attacker does to hide a gap or make room: rewrite seq as 1, 2, 3 … keeping the hashes."""
    return [replace(row, seq=index) for index, row in enumerate(rows, start=1)]


def forged(seq: int, prev_hash: str) -> SealedEvent:
    fake = replace(event(seq), id="evt_forged", outcome="ok", actor="mallory@example.com")
    return SealedEvent(
        seq=seq, prev_hash=prev_hash, hash=chain_hash(b"a guessed key", prev_hash, seq, fake), event=fake
    )


# --- Keys, canonical bytes, sealing ------------------------------------------------------------------------------


def test_each_purpose_gets_its_own_key_derived_from_the_audit_key() -> None:
    expected = hmac.new(AUDIT_KEY, b"bastion/audit/v1/chain", hashlib.sha256).digest()
    assert expected == CHAIN_KEY
    assert len({CHAIN_KEY, CHECKPOINT_KEY, ARGUMENTS_KEY, derive_key(b"another audit key", "chain")}) == 4


def test_canonical_bytes_are_compact_sorted_json_of_seq_and_every_field() -> None:
    data = json.loads(canonical(7, event(7)).decode("utf-8"))
    assert list(data) == sorted(["seq", *(f.name for f in fields(AuditEvent))])
    assert data["seq"] == 7
    assert data["occurred_at"] == "2025-03-01T12:00:07.123463Z"
    assert (
        canonical(7, event(7)) == json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )


def test_canonical_bytes_do_not_depend_on_how_the_database_spells_the_time_zone() -> None:
    utc = event(1)
    moment = utc.occurred_at
    kolkata = replace(utc, occurred_at=moment.astimezone(timezone(timedelta(hours=5, minutes=30))))
    naive = replace(utc, occurred_at=moment.replace(tzinfo=None))  # how SQLite hands it back
    assert canonical(1, utc) == canonical(1, kolkata) == canonical(1, naive)
    assert canonical(1, utc) != canonical(1, replace(utc, occurred_at=moment + timedelta(microseconds=1)))


def test_whole_seconds_keep_six_fractional_digits() -> None:
    whole = replace(event(1), occurred_at=datetime(2025, 1, 1, tzinfo=UTC))
    assert b'"occurred_at":"2025-01-01T00:00:00.000000Z"' in canonical(1, whole)


def test_seal_numbers_events_after_the_previous_one_and_links_each_to_the_one_before() -> None:
    rows = chain()
    assert [r.seq for r in rows] == list(range(1, N + 1))
    assert rows[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    assert rows[4].hash == chain_hash(CHAIN_KEY, rows[3].hash, 5, event(5))


def test_sealing_in_batches_gives_the_same_chain_as_sealing_at_once() -> None:
    rows = chain()
    first = seal(CHAIN_KEY, 0, GENESIS, [r.event for r in rows[:7]])
    rest = seal(CHAIN_KEY, first[-1].seq, first[-1].hash, [r.event for r in rows[7:]])
    assert first + rest == rows


@pytest.mark.parametrize(("prev_seq", "prev_hash"), [(-1, GENESIS), (0, "ab" * 32), (3, "not a hash"), (3, "AB" * 32)])
def test_seal_refuses_to_continue_from_an_impossible_chain_end(prev_seq: int, prev_hash: str) -> None:
    with pytest.raises(ValidationFailed):
        seal(CHAIN_KEY, prev_seq, prev_hash, [event(1)])


def test_a_chain_sealed_with_another_key_does_not_verify() -> None:
    rows = seal(b"not the audit chain key", 0, GENESIS, [event(i) for i in range(1, 4)])
    assert broken(check(rows, None)) == (TamperKind.ALTERED, 1)


# --- Verification of intact chains -----------------------------------------------------------------------------


def test_an_intact_chain_verifies_with_its_head() -> None:
    rows = chain(500)
    verdict = check(rows, head_of(rows), (checkpoint_at(rows, 100), checkpoint_at(rows, 500)))
    assert verdict == Verdict(checked=500, first_seq=1, last_seq=500, broken=None)
    assert verdict.ok


@given(st.lists(events, max_size=15))
def test_any_sealed_events_verify(batch: list[AuditEvent]) -> None:
    rows = seal(CHAIN_KEY, 0, GENESIS, batch)
    verdict = check(rows, head_of(rows) if rows else None)
    assert verdict.ok
    assert verdict.checked == len(batch)


def test_an_empty_log_without_a_head_is_intact() -> None:
    assert check([], None) == Verdict(checked=0, first_seq=None, last_seq=None, broken=None)


def test_a_log_pruned_to_the_checkpoint_its_head_points_at_is_intact() -> None:
    rows = chain()
    assert check([], head_of(rows), (checkpoint_at(rows, N),)).ok


def test_verify_reads_the_rows_as_a_stream_with_a_bounded_look_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_LOOKAHEAD_ROWS", 4)
    rows = chain(200)
    rows[2] = replace(rows[2], event=replace(rows[2].event, outcome="error"))
    pulled = 0

    def stream() -> Iterator[SealedEvent]:
        nonlocal pulled
        for row in rows:
            pulled += 1
            yield row

    verdict = verify(stream(), chain_key=CHAIN_KEY, checkpoint_key=CHECKPOINT_KEY, head=head_of(rows))
    assert broken(verdict) == (TamperKind.ALTERED, 3)
    assert pulled <= 3 + 4 + 1


# --- Each kind of tampering, named with the first broken seq -----------------------------------------------------


def test_a_field_altered_in_place_is_reported_as_altered_at_that_event() -> None:
    rows = chain()
    rows[6] = replace(rows[6], event=replace(rows[6].event, outcome="ok", decision="allow", reason=None))
    verdict = check(rows, head_of(chain()))
    assert broken(verdict) == (TamperKind.ALTERED, 7)
    assert verdict.broken is not None
    assert verdict.broken.detail == "event 7 was altered (its content does not match its hash)"
    assert (verdict.checked, verdict.first_seq, verdict.last_seq) == (6, 1, 6)


def test_a_deleted_middle_row_is_reported_as_deleted_at_its_seq() -> None:
    rows = chain()
    del rows[9]
    assert broken(check(rows, head_of(chain()))) == (TamperKind.DELETED, 10)


def test_a_deleted_row_hidden_by_renumbering_the_rest_is_still_reported_as_deleted() -> None:
    rows = chain()
    del rows[9]
    assert broken(check(renumbered(rows), None)) == (TamperKind.DELETED, 10)


@pytest.mark.parametrize("links_to_previous", [True, False], ids=["plausible-link", "junk-link"])
def test_a_forged_row_inserted_mid_chain_with_the_rest_renumbered_is_reported_as_inserted(
    links_to_previous: bool,
) -> None:
    rows = chain()
    prev = rows[6].hash if links_to_previous else "f" * 64
    rows.insert(7, forged(8, prev))
    assert broken(check(renumbered(rows), head_of(chain()))) == (TamperKind.INSERTED, 8)


def test_a_forged_row_appended_after_the_head_is_reported_as_inserted() -> None:
    rows = chain()
    head = head_of(rows)
    rows.append(forged(N + 1, rows[-1].hash))
    assert broken(check(rows, head)) == (TamperKind.INSERTED, N + 1)


def test_swapping_the_seq_of_two_adjacent_rows_is_reported_as_reordered() -> None:
    rows = chain()
    rows[10], rows[11] = replace(rows[11], seq=11), replace(rows[10], seq=12)
    assert broken(check(rows, head_of(chain()))) == (TamperKind.REORDERED, 11)


def test_moving_a_row_far_back_is_reported_as_reordered_where_the_order_first_differs() -> None:
    rows = chain()
    rows.insert(3, rows.pop(15))
    assert broken(check(renumbered(rows), head_of(chain()))) == (TamperKind.REORDERED, 4)


def test_dropping_the_newest_rows_is_reported_as_truncated_by_the_head() -> None:
    rows = chain()
    assert broken(check(rows[:-3], head_of(rows))) == (TamperKind.TRUNCATED, N - 2)


@pytest.mark.parametrize("head", ["replayed", "deleted"])
def test_truncation_behind_a_rolled_back_head_is_caught_by_an_exported_checkpoint(head: str) -> None:
    rows = chain()
    exported = Checkpoint.from_json(json.loads(json.dumps(checkpoint_at(rows, N - 1).to_json())))
    kept = rows[:-3]
    old_head = head_of(kept) if head == "replayed" else None  # a genuine older head record, MAC and all
    verdict = check(kept, old_head, (exported,))
    assert broken(verdict) == (TamperKind.TRUNCATED, N - 2)


def test_a_head_record_with_a_wrong_mac_is_reported_as_altered() -> None:
    rows = chain()
    seq, hash_, _ = head_of(rows)
    verdict = check(rows, (seq, hash_, "0" * 64))
    assert broken(verdict) == (TamperKind.ALTERED, N)
    assert verdict.broken is not None
    assert "chain head record was altered" in verdict.broken.detail


def test_rows_beyond_a_genuine_head_are_reported_as_inserted() -> None:
    rows = chain()
    assert broken(check(rows, head_of(rows[:17]))) == (TamperKind.INSERTED, 18)


def test_a_duplicated_seq_is_reported_as_inserted() -> None:
    rows = chain()
    rows.insert(5, rows[4])
    assert broken(check(rows, head_of(chain()))) == (TamperKind.INSERTED, 5)


def test_a_row_that_contradicts_its_signed_checkpoint_is_reported_as_altered() -> None:
    rows = chain()
    other = seal(CHAIN_KEY, 0, GENESIS, [replace(event(i), id=f"other_{i}") for i in range(1, N + 1)])
    verdict = check(rows, head_of(rows), (checkpoint_at(other, 5),))
    assert broken(verdict) == (TamperKind.ALTERED, 5)


@given(data=st.data(), index=st.integers(min_value=0, max_value=N - 1), field=st.sampled_from(list(FIELD_VALUES)))
def test_any_single_field_alteration_of_any_row_is_detected_at_that_row(
    data: st.DataObject, index: int, field: str
) -> None:
    rows = chain()
    original = rows[index]
    altered = replace(original.event, **{field: data.draw(FIELD_VALUES[field])})
    assume(canonical(original.seq, altered) != canonical(original.seq, original.event))
    rows[index] = replace(original, event=altered)
    assert broken(check(rows, head_of(chain()))) == (TamperKind.ALTERED, index + 1)


@given(
    data=st.data(),
    index=st.integers(min_value=0, max_value=N - 1),
    column=st.sampled_from(["prev_hash", "hash"]),
    optional=st.sampled_from([f.name for f in fields(AuditEvent) if f.default is None]),
)
def test_any_altered_link_or_optional_field_is_detected_at_that_row(
    data: st.DataObject, index: int, column: str, optional: str
) -> None:
    rows = chain()
    original = rows[index]
    if data.draw(st.booleans()):
        value = data.draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
        assume(value != getattr(original, column))
        rows[index] = replace(original, **{column: value})
    else:
        value = data.draw(optional_text)
        assume(value != getattr(original.event, optional))
        rows[index] = replace(original, event=replace(original.event, **{optional: value}))
    assert broken(check(rows, head_of(chain()))) == (TamperKind.ALTERED, index + 1)


# --- Pruning and checkpoints -----------------------------------------------------------------------------------


def test_rows_pruned_up_to_a_checkpoint_verify_from_that_checkpoint() -> None:
    rows = chain()
    verdict = check(rows[10:], head_of(rows), (checkpoint_at(rows, 10),))
    assert verdict == Verdict(checked=10, first_seq=11, last_seq=N, broken=None)


def test_rows_pruned_without_a_checkpoint_are_reported_as_deleted_from_the_start() -> None:
    rows = chain()
    assert broken(check(rows[10:], head_of(rows))) == (TamperKind.DELETED, 1)


def test_rows_missing_after_the_last_checkpoint_are_reported_as_deleted_from_there() -> None:
    rows = chain()
    assert broken(check(rows[10:], head_of(rows), (checkpoint_at(rows, 5),))) == (TamperKind.DELETED, 6)


def test_a_deletion_right_after_the_pruning_checkpoint_is_still_found() -> None:
    rows = chain()
    assert broken(check(rows[11:], head_of(rows), (checkpoint_at(rows, 10),))) == (TamperKind.DELETED, 11)


def test_a_forged_checkpoint_is_reported_as_a_bad_checkpoint() -> None:
    rows = chain()
    real = checkpoint_at(rows, 10)
    fake = replace(real, signature="0" * 64)
    verdict = check(rows[10:], head_of(rows), (fake,))
    assert broken(verdict) == (TamperKind.BAD_CHECKPOINT, 10)


@pytest.mark.parametrize("key", [CHAIN_KEY, b"guessed"], ids=["chain-key", "guessed-key"])
def test_a_checkpoint_signed_with_any_other_key_is_not_valid(key: bytes) -> None:
    rows = chain()
    forged_checkpoint = sign_checkpoint(key, 10, rows[9].hash, T0)
    assert not checkpoint_valid(CHECKPOINT_KEY, forged_checkpoint)
    assert broken(check(rows, head_of(rows), (forged_checkpoint,))) == (TamperKind.BAD_CHECKPOINT, 10)


@pytest.mark.parametrize(
    "change", [{"seq": 11}, {"hash": "ab" * 32}, {"created_at": T0}, {"signature": "Ω" * 64}], ids=str
)
def test_changing_any_part_of_a_checkpoint_breaks_its_signature(change: dict[str, object]) -> None:
    real = checkpoint_at(chain(), 10)
    assert checkpoint_valid(CHECKPOINT_KEY, real)
    assert not checkpoint_valid(CHECKPOINT_KEY, replace(real, **change))


def test_a_checkpoint_survives_a_json_round_trip_through_any_time_zone() -> None:
    real = checkpoint_at(chain(), 10)
    data = real.to_json()
    assert data == {
        "seq": 10,
        "hash": real.hash,
        "created_at": "2025-03-01T13:00:00.123456Z",
        "signature": real.signature,
    }
    read = Checkpoint.from_json(json.loads(json.dumps(data)))
    assert read == real
    shifted = Checkpoint.from_json({**data, "created_at": "2025-03-01T14:00:00.123456+01:00"})
    assert checkpoint_valid(CHECKPOINT_KEY, shifted)


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "checkpoint",
        {"seq": 10, "hash": "ab" * 32, "created_at": "2025-03-01T13:00:00Z"},
        {"seq": 10, "hash": "ab" * 32, "created_at": "2025-03-01T13:00:00Z", "signature": "cd" * 32, "extra": 1},
        {"seq": 0, "hash": "ab" * 32, "created_at": "2025-03-01T13:00:00Z", "signature": "cd" * 32},
        {"seq": True, "hash": "ab" * 32, "created_at": "2025-03-01T13:00:00Z", "signature": "cd" * 32},
        {"seq": "10", "hash": "ab" * 32, "created_at": "2025-03-01T13:00:00Z", "signature": "cd" * 32},
        {"seq": 10, "hash": "AB" * 32, "created_at": "2025-03-01T13:00:00Z", "signature": "cd" * 32},
        {"seq": 10, "hash": "ab" * 32, "created_at": "2025-03-01T13:00:00Z", "signature": "cd"},
        {"seq": 10, "hash": "ab" * 32, "created_at": "2025-03-01T13:00:00", "signature": "cd" * 32},
        {"seq": 10, "hash": "ab" * 32, "created_at": "yesterday", "signature": "cd" * 32},
        {"seq": 10, "hash": "ab" * 32, "created_at": 1700000000, "signature": "cd" * 32},
    ],
    ids=repr,
)
def test_a_malformed_checkpoint_is_refused(data: JSONValue) -> None:
    with pytest.raises(ValidationFailed):
        Checkpoint.from_json(data)


@pytest.mark.parametrize(("seq", "hash_"), [(0, "ab" * 32), (5, "not a hash")])
def test_sign_checkpoint_refuses_what_cannot_be_a_chain_position(seq: int, hash_: str) -> None:
    with pytest.raises(ValidationFailed):
        sign_checkpoint(CHECKPOINT_KEY, seq, hash_, T0)


def test_an_empty_log_with_a_checkpoint_is_reported_as_truncated_from_the_start() -> None:
    assert broken(check([], None, (checkpoint_at(chain(), 5),))) == (TamperKind.TRUNCATED, 1)


# --- Arguments digest and preview ------------------------------------------------------------------------------


def test_arguments_hmac_ignores_key_order_and_depends_on_the_key() -> None:
    one = arguments_hmac(ARGUMENTS_KEY, {"a": 1, "b": ["x", {"c": None}]})
    assert one == arguments_hmac(ARGUMENTS_KEY, {"b": ["x", {"c": None}], "a": 1})
    assert len(one) == 64
    assert one != arguments_hmac(derive_key(b"another audit key", "arguments"), {"a": 1, "b": ["x", {"c": None}]})
    assert one != arguments_hmac(ARGUMENTS_KEY, {"a": 2, "b": ["x", {"c": None}]})


@given(json_values, st.binary(min_size=1), st.binary(min_size=1))
def test_arguments_hmac_is_deterministic_and_key_dependent(value: JSONValue, key: bytes, other: bytes) -> None:
    assume(key != other)
    assert arguments_hmac(key, value) == arguments_hmac(key, json.loads(json.dumps(value)))
    assert arguments_hmac(key, value) != arguments_hmac(other, value)


def test_preview_of_ordinary_arguments_is_their_compact_json() -> None:
    arguments: JSONValue = {"owner": "octo", "repo": "bastion", "labels": ["bug", "ü"], "limit": 5, "draft": False}
    assert preview(arguments) == '{"owner":"octo","repo":"bastion","labels":["bug","ü"],"limit":5,"draft":false}'


@pytest.mark.parametrize(
    "key",
    ["password", "DB_PASSWD", "client_secret", "refresh_token", "X-Api-Key", "apiKey", "Authorization", "authToken",
     "Cookie", "aws_credentials", "PRIVATE-KEY", "sessionId"],
)  # fmt: skip
def test_preview_redacts_the_value_of_any_secret_looking_key(key: str) -> None:
    assert preview({"user": "ada", key: {"nested": "CanaryHunter2"}}) == f'{{"user":"ada","{key}":"[REDACTED]"}}'


@pytest.mark.parametrize(
    "value",
    [
        "bst_0123456789ABCDEFGHIJabcdefghij012345",
        "bsk_0123456789ABCDEFGHIJabcdefghij012345",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "sk-proj-abc123",
        "ghp_CanaryGithub0123456789abcdefghijklmn",
        "xoxb-1111-2222-Canary",
        "Bearer CanaryOpaque",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
        "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9v",
        "https://ada:CanaryPass@example.com/",
    ],
)
def test_preview_redacts_credential_shaped_values_wherever_they_are(value: str) -> None:
    assert preview({"q": [value]}) == '{"q":["[REDACTED]"]}'


def test_preview_redacts_a_token_inside_a_sentence_and_keeps_the_sentence() -> None:
    text = "use bst_0123456789ABCDEFGHIJabcdefghij012345 for the deploy"
    assert preview({"note": text}) == '{"note":"use [REDACTED] for the deploy"}'


def test_a_long_preview_is_cut_to_the_limit_with_an_ellipsis() -> None:
    shown = preview({"items": list(range(1000))})
    assert len(shown) == PREVIEW_MAX_CHARS
    assert shown.startswith('{"items":[0,1,2,')
    assert shown.endswith("…")


def test_preview_survives_pathological_json() -> None:
    deep: JSONValue = []
    for _ in range(50_000):
        deep = [deep]
    assert preview(deep, limit=20) == "[" * 19 + "…"
    assert preview([10**5000]) == '["<integer too long to show>"]'
    assert preview({"k": "\ud800"}).encode("utf-8") == b'{"k":"\\ud800"}'
    assert preview(float("nan")) == "NaN"
    assert preview({"a": 1}, limit=0) == ""


@given(json_values, st.integers(min_value=1, max_value=600))
def test_preview_never_exceeds_its_limit(value: JSONValue, limit: int) -> None:
    assert len(preview(value, limit)) <= limit


@given(json_values)
def test_an_uncut_preview_of_harmless_json_is_valid_json(value: JSONValue) -> None:
    shown = preview(value, limit=1_000_000)
    json.loads(shown)  # redaction replaces whole strings, so the structure survives


SECRET_WORDS = ["password", "passwd", "secret", "token", "api_key", "apikey", "authorization", "auth", "cookie",
                "credential", "private_key", "session"]  # fmt: skip
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
affixes = st.text(alphabet="abcxyz_-.", max_size=5)


def secret_key(before: str, word: str, upper: bool, after: str) -> str:
    return before + (word.upper() if upper else word) + after


secret_keys = st.builds(secret_key, affixes, st.sampled_from(SECRET_WORDS), st.booleans(), affixes)
canaries = st.text(alphabet=BASE62, min_size=12, max_size=40).map(lambda s: "Canary" + s)
bst_tokens = st.text(alphabet=BASE62, min_size=38, max_size=38).map(lambda s: "bst_" + s)


@given(json_objects, secret_keys, canaries, bst_tokens, st.sampled_from(["value", "sentence", "key", "list"]))
def test_preview_never_shows_a_canary_under_a_secret_key_or_a_bst_token(
    around: dict[str, JSONValue], key: str, canary: str, token: str, placement: str
) -> None:
    planted: dict[str, JSONValue] = {key: canary}
    if placement == "value":
        planted["note"] = token
    elif placement == "sentence":
        planted["note"] = f"please use {token}, thanks"
    elif placement == "key":
        planted[token] = "x"
    else:
        planted["notes"] = [1, {"deeper": [token]}]
    shown = preview({**planted, "around": around}, limit=1_000_000)
    assert canary not in shown
    assert token not in shown
    assert token[4:20] not in shown
