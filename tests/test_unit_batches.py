"""The batch records and their chunk bookkeeping (tasks/batches.py) on fakeredis: states never
leave a final one, a chunk is counted once, a closed batch counts no late chunk, one worker
advances a batch at a time; chunk messages go with a low priority and only they."""
from __future__ import annotations

import time

import fakeredis
import pytest

from tasks.batches import (CHUNK_PRIORITY, BatchRecord, BatchStore, ChunkDone, chunk_route, is_chunk_job,
                           new_batch_id, new_chunk_job_id, operation_row)
from tasks.names import TASK_INFER
from tasks.store import new_job_id


@pytest.fixture
def batches() -> BatchStore:
    return BatchStore(fakeredis.FakeRedis(decode_responses=True), ttl_s=60)


def make(batches: BatchStore, **fields: object) -> BatchRecord:
    now = int(time.time())
    record = BatchRecord(id=new_batch_id(), endpoint="/v1/embeddings", input_file_id="file-x", created_at=now,
                         expires_at=now + 60, expires_at_s=now + 60.0, **fields)
    batches.create(record)
    return record


def test_a_final_state_is_never_left_and_each_move_stamps_its_time(batches: BatchStore) -> None:
    b = make(batches)
    assert batches.active_ids() == [b.id]
    moved = batches.move(b.id, "in_progress", allowed_from=("validating",), chunks=2)
    assert moved is not None and moved.status == "in_progress" and moved.in_progress_at and moved.chunks == 2
    assert batches.move(b.id, "in_progress", allowed_from=("validating",)).in_progress_at == moved.in_progress_at
    done = batches.move(b.id, "completed", allowed_from=("in_progress",))
    assert done.status == "completed" and done.completed_at and batches.active_ids() == []
    again = batches.move(b.id, "cancelling", allowed_from=("validating", "in_progress", "completed"))
    assert again.status == "completed" and again.cancelling_at is None
    assert batches.move("batch_nope", "failed", allowed_from=("validating",)) is None


def test_a_chunk_is_counted_once_and_none_after_closing(batches: BatchStore) -> None:
    b = make(batches)
    assert batches.mark_done(b.id, 0, ChunkDone(completed=3)) == 1
    assert batches.mark_done(b.id, 0, ChunkDone(completed=3)) == 1  # a re-run chunk
    assert batches.mark_done(b.id, 1, ChunkDone(completed=1, failed=1, input_tokens=5)) == 2
    closed = batches.close(b.id)
    assert sorted(closed) == [0, 1] and closed[1].failed == 1
    assert batches.mark_done(b.id, 2, ChunkDone(completed=9)) is None and batches.closed(b.id)
    assert sorted(batches.done(b.id)) == ["0", "1"]


def test_one_holder_advances_a_batch_at_a_time(batches: BatchStore) -> None:
    b = make(batches)
    assert batches.lease(b.id, "w1", 30) and batches.lease(b.id, "w1", 30)
    assert not batches.lease(b.id, "w2", 30) and batches.leased(b.id)
    batches.release(b.id, "w2")  # not the holder: nothing
    assert batches.leased(b.id)
    batches.release(b.id, "w1")
    assert batches.lease(b.id, "w2", 30)


def test_chunk_job_ids_are_claimed_once_per_index(batches: BatchStore) -> None:
    b = make(batches)
    first = batches.claim_chunk(b.id, 0, new_chunk_job_id())
    assert batches.claim_chunk(b.id, 0, new_chunk_job_id()) == first
    assert batches.chunk_jobs(b.id) == {0: first}


def test_list_pages_newest_first(batches: BatchStore) -> None:
    made = []
    for _ in range(5):
        made.append(make(batches).id)
        time.sleep(0.002)  # distinct creation times: the order under test, not a synchronisation
    page, more = batches.list(limit=2)
    assert [r.id for r in page] == made[::-1][:2] and more
    page, more = batches.list(after=page[-1].id, limit=10)
    assert [r.id for r in page] == made[::-1][2:] and not more


def test_only_chunk_messages_go_with_the_low_priority() -> None:
    chunk = new_chunk_job_id()
    assert len(chunk) == 32 and int(chunk, 16) >= 0 and is_chunk_job(chunk)
    assert not any(is_chunk_job(new_job_id()) for _ in range(200))
    assert chunk_route(TASK_INFER, [chunk], {"route": 1}, {}) == {"priority": CHUNK_PRIORITY}
    assert chunk_route(TASK_INFER, [new_job_id()], {}, {}) is None
    assert chunk_route("modelbay.load", [], {}, {}) is None


def test_the_operations_row_of_a_running_batch() -> None:
    now = int(time.time())
    b = BatchRecord(id=new_batch_id(), endpoint="/v1/embeddings", input_file_id="f", created_at=now - 20,
                    in_progress_at=now - 10, status="in_progress", models=["m"],
                    request_counts={"total": 100, "completed": 0, "failed": 0})
    row = operation_row(b, {"0": ChunkDone(completed=15, failed=5)}, now)
    assert row["kind"] == "batch" and row["lines_done"] == 20 and row["lines_total"] == 100
    assert row["rate_lps"] == 2.0 and row["eta_s"] == 40.0 and row["progress"] == 20.0 and row["model"] == "m"
