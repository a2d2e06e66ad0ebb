"""The operations table's merge rules (architecture §5), one test per rule, on a clock the test moves."""
from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from web.ops import OpsTable

TTL, GRACE = 60.0, 10.0


class Clock:
    """A monotonic clock whose ``now`` the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> OpsTable:
    return OpsTable(ttl_s=TTL, error_grace_s=GRACE, clock=clock, wall=lambda: 1_790_000_000.25)


def ev(op: str = "op1", seq: int = 1, status: Any = "progress", **fields: Any) -> dict[str, Any]:
    body = {"v": 1, "op": op, "kind": "staging", "status": status, "seq": seq, "origin": "w1",
            "model": "m", "node": "n1", "job": op, "phase": "staging", "file": None,
            "file_index": None, "files_total": None, "bytes_done": seq * 10, "bytes_total": 1000,
            "progress": None, "message": None, "error": None, "started_at": "2026-01-01T00:00:00.000Z",
            "ts": 0.0}
    body.update(fields)
    if status is ...:
        del body["status"]
    return body


def test_row_shape(table: OpsTable) -> None:
    assert table.apply(ev(seq=1, status="start"))
    row = table.get("op1")
    assert row is not None and "v" not in row
    assert row["origin_local"] is False and row["bytes_done"] == 10
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row["updated_at"])
    expected = datetime.fromtimestamp(1_790_000_000.25, UTC).isoformat(timespec="milliseconds")
    assert row["updated_at"] == expected.replace("+00:00", "Z")        # as tasks.schemas.utcnow


# Rule 1 -------------------------------------------------------------------------------------

def test_local_op_ignores_remote_events_and_its_echo(table: OpsTable, clock: Clock) -> None:
    assert table.local(ev(seq=3, origin="me", bytes_done=30))
    v = table.version()
    assert not table.apply(ev(seq=3, origin="me"))                   # its own echo
    assert not table.apply(ev(seq=9, origin="other", bytes_done=90))  # higher seq, other origin
    assert not table.apply(ev(seq=10, status="complete"))            # cannot delete it
    assert not table.apply(ev(seq=11, status="error", error="x"))
    row = table.get("op1")
    assert row is not None and row["origin_local"] is True and row["bytes_done"] == 30
    assert table.version() == v
    clock.now += TTL * 5                                             # no TTL on local rows
    assert table.get("op1") is not None


def test_local_replaces_unconditionally_and_honours_status(table: OpsTable, clock: Clock) -> None:
    table.apply(ev(seq=5, bytes_done=50))                            # a mirror seen first
    assert table.local(ev(seq=1, bytes_done=1))                      # local wins, any seq
    assert table.get("op1")["bytes_done"] == 1
    assert table.local(ev(seq=0, status="error", error="boom"))
    assert table.get("op1")["status"] == "error"
    clock.now += GRACE + 0.1
    assert table.get("op1") is None
    assert table.local(ev(op="op2", seq=1))
    assert table.local(ev(op="op2", seq=2, status="complete"))
    assert table.get("op2") is None
    assert not table.apply(ev(op="op2", seq=1))                      # late echo after complete
    assert not table.apply(ev(op="op2", seq=99))
    assert table.snapshot() == []


# Rule 2 -------------------------------------------------------------------------------------

def test_mirrored_op_replaced_only_by_higher_seq(table: OpsTable) -> None:
    assert table.apply(ev(seq=2))
    assert not table.apply(ev(seq=2, bytes_done=999))                # duplicate
    assert not table.apply(ev(seq=1, bytes_done=999))                # out of order
    assert table.get("op1")["bytes_done"] == 20
    assert table.apply(ev(seq=7))
    assert table.get("op1")["seq"] == 7 and table.get("op1")["bytes_done"] == 70


# Rule 3 -------------------------------------------------------------------------------------

def test_complete_removes_and_tombstone_blocks_late_events(table: OpsTable, clock: Clock) -> None:
    table.apply(ev(seq=1, status="start"))
    table.apply(ev(seq=3))
    assert table.apply(ev(seq=5, status="complete"))
    assert table.get("op1") is None and table.snapshot() == []
    assert not table.apply(ev(seq=4))                                # late progress
    assert not table.apply(ev(seq=5, status="complete"))             # duplicate complete
    clock.now += TTL - 1
    assert not table.apply(ev(seq=4))
    assert table.snapshot() == []
    clock.now += 2                                                   # tombstone gone after ttl_s
    assert table.apply(ev(seq=4))


def test_complete_of_unknown_op_changes_no_row(table: OpsTable) -> None:
    v = table.version()
    assert not table.apply(ev(seq=9, status="complete"))
    assert table.version() == v
    assert not table.apply(ev(seq=8))                                # still blocked by its seq


# Rule 4 -------------------------------------------------------------------------------------

def test_error_row_visible_for_grace_then_gone(table: OpsTable, clock: Clock) -> None:
    table.apply(ev(seq=1))
    assert table.apply(ev(seq=2, status="error", error="disk full", message="staging failed"))
    clock.now += GRACE - 0.5
    (row,) = table.snapshot()
    assert (row["status"], row["error"], row["message"]) == ("error", "disk full", "staging failed")
    assert not table.apply(ev(seq=1, status="keepalive"))            # no stale refresh of grace
    clock.now += 1.0
    assert table.snapshot() == [] and table.get("op1") is None
    assert not table.apply(ev(seq=1))                                # no resurrection afterwards


def test_error_replaced_by_higher_seq(table: OpsTable, clock: Clock) -> None:
    table.apply(ev(seq=2, status="error", error="transient"))
    assert table.apply(ev(seq=3, status="progress"))
    clock.now += GRACE + 1                                           # now on the TTL again
    assert table.get("op1")["status"] == "progress"


def test_expire_prunes_now_and_counts_rows(table: OpsTable, clock: Clock) -> None:
    table.apply(ev(op="a", seq=1, status="error", error="x"))
    table.apply(ev(op="b", seq=1))
    table.apply(ev(op="c", seq=1, status="complete"))                # a tombstone, not a row
    v = table.version()
    clock.now += GRACE + 0.1
    assert table.expire() == 1 and table.version() == v + 1
    assert table.expire() == 0 and table.version() == v + 1
    clock.now += TTL
    assert table.expire() == 1                                       # b; c's tombstone is no row


# Rule 5 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [..., None, ""])
def test_event_without_status_changes_nothing(table: OpsTable, clock: Clock, status: Any) -> None:
    assert not table.apply(ev(op="new", seq=1, status=status))
    assert table.get("new") is None
    table.apply(ev(seq=1))
    v = table.version()
    clock.now += TTL - 1
    assert not table.apply(ev(seq=2, status=status, bytes_done=999))
    assert not table.local(ev(seq=3, status=status))
    assert table.version() == v and table.get("op1")["bytes_done"] == 10
    clock.now += 2                                                   # expiry not refreshed
    assert table.get("op1") is None


# Rule 6 -------------------------------------------------------------------------------------

def test_mirrored_row_expires_ttl_after_last_event(table: OpsTable, clock: Clock) -> None:
    table.apply(ev(seq=1))
    clock.now += TTL - 1
    assert table.get("op1") is not None
    v = table.version()
    clock.now += 1
    assert table.get("op1") is None and table.snapshot() == []
    assert table.version() > v                                       # expiry is a change


def test_keepalive_refreshes_expiry(table: OpsTable, clock: Clock) -> None:
    table.apply(ev(seq=1))
    clock.now += TTL - 1
    assert table.apply(ev(seq=2, status="keepalive", bytes_done=25))
    clock.now += TTL - 1
    assert table.get("op1")["bytes_done"] == 25
    assert not table.apply(ev(seq=2, status="keepalive", bytes_done=0))  # stale: expiry only
    clock.now += TTL - 1
    row = table.get("op1")
    assert row is not None and row["bytes_done"] == 25
    clock.now += 1.5
    assert table.get("op1") is None


# Rule 7 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    None, [], "x", {}, {"seq": 1, "status": "progress"}, {"op": "", "seq": 1, "status": "progress"},
    {"op": 5, "seq": 1, "status": "progress"}, {"op": "a", "status": "progress"},
    {"op": "a", "seq": "1", "status": "progress"}, {"op": "a", "seq": 1.0, "status": "progress"},
    {"op": "a", "seq": None, "status": "progress"}, {"op": "a", "seq": True, "status": "progress"},
    {"op": "a", "seq": 1, "status": 3},
])
def test_malformed_events_are_ignored(table: OpsTable, bad: Any) -> None:
    assert table.apply(bad) is False
    assert table.snapshot() == [] and table.version() == 0


def test_concurrent_apply_and_snapshot() -> None:
    table = OpsTable()
    errors: list[BaseException] = []

    def writer(base: int) -> None:
        try:
            for seq in range(1, 2001):
                table.apply(ev(op=f"op{base}-{seq % 50}", seq=seq,
                               status="complete" if seq % 7 == 0 else "progress"))
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    seen: dict[str, int] = {}
    versions: list[int] = []
    while any(t.is_alive() for t in threads):
        versions.append(table.version())
        rows = table.snapshot()
        assert [r["op"] for r in rows] == sorted(r["op"] for r in rows)  # same started_at: by op
        for row in rows:
            # Every row is one whole accepted event: never a complete, never torn, never older
            # than a row of the same op seen before.
            assert row["status"] == "progress" and row["bytes_done"] == row["seq"] * 10, row
            assert row["op"] == f"{row['op'].split('-')[0]}-{row['seq'] % 50}", row
            assert row["seq"] >= seen.get(row["op"], 0), (row, seen[row["op"]])
            seen[row["op"]] = row["seq"]
    for t in threads:
        t.join()
    assert not errors
    assert versions == sorted(versions)
    # The end state: each op's row is its last event (seq 1951..2000 for op k: 1950 + k, or
    # 2000 for k = 0), gone where that event was a complete (seq divisible by 7).
    expected = {}
    for base in range(3):
        for k in range(50):
            last = 2000 if k == 0 else 1950 + k
            if last % 7:
                expected[f"op{base}-{k}"] = last
    assert {r["op"]: r["seq"] for r in table.snapshot()} == expected
    assert all(r["status"] == "progress" and r["bytes_done"] == r["seq"] * 10 for r in table.snapshot())
    assert all(table.get(op) is None for op in (f"op{b}-{k}" for b in range(3) for k in range(50))
               if op not in expected)


def test_wait_change_wakes_on_change_and_times_out(table: OpsTable) -> None:
    v = table.version()
    t0 = time.monotonic()
    assert table.wait_change(v, 0.05) == v
    assert time.monotonic() - t0 >= 0.04
    threading.Timer(0.05, lambda: table.apply(ev(seq=1))).start()
    assert table.wait_change(v, 5.0) == v + 1


def test_wait_change_signals_expiry(table: OpsTable, clock: Clock) -> None:
    table.apply(ev(seq=1))
    v = table.version()
    clock.now += TTL + 1
    assert table.wait_change(v, 1.0) > v


# Rule 8 and reads ---------------------------------------------------------------------------

def test_snapshot_returns_sorted_copies(table: OpsTable) -> None:
    table.apply(ev(op="b", seq=1, started_at="2026-01-01T00:00:02.000Z"))
    table.apply(ev(op="a", seq=1, started_at="2026-01-01T00:00:02.000Z"))
    table.apply(ev(op="c", seq=1, started_at="2026-01-01T00:00:01.000Z"))
    rows = table.snapshot()
    assert [r["op"] for r in rows] == ["c", "a", "b"]
    rows[0]["bytes_done"] = -1
    rows[0].clear()
    table.get("a")["status"] = "mutated"
    assert table.get("c")["bytes_done"] == 10 and table.get("a")["status"] == "progress"


