"""The model queues' consumer: threads of the worker process that each take a job's message
when they are free and run the job themselves (architecture §9).

A worker consumes ``model.<token>`` while it holds the model ready, so any holder pulls the
model's next job. Celery's consumer would take the message in its main thread (BRPOP, then
the ``unacked`` bookkeeping), hand it to a pool thread, and acknowledge it back on the main
thread: about as much CPU per job as the whole of a raw Celery round trip, and three thread
hand-offs (docs/benchmarks.md, "Fifth round"). Here each of ``threads`` threads does it all:

1. BRPOP over its wake list and every consumed queue's lists, highest priority first (kombu's
   order: ``[q for priority for q in queues]``; the queue last served goes last);
2. the message is recorded in kombu's ``unacked`` hash and ``unacked_index`` in kombu's own
   format (:meth:`tasks.queues.QueueStore.note_taken`), so a worker SIGKILLed now loses
   nothing: the reaper rescues the job (:mod:`workers.node.stranded`) and kombu restores the
   message after the visibility timeout;
3. the task the message names runs in this thread (the same Celery task, called directly); an
   inference job's record is read in the round trip of step 2 and handed to the task
   (``record``), which then reads nothing before it starts the job;
4. the entry is dropped: the acknowledgement (acks late, on failure too, as Celery's
   ``task_acks_late`` and ``task_acks_on_failure_or_timeout``).

An inference job queued by the ready path carries its record as queued in its message
(``modelbay_record``, :mod:`tasks.readypath`). Then steps 2 and 4 ride on the job's own writes
(:class:`Taken`): the move to ``running`` records the message as taken in the same round trip
(:mod:`tasks.cas`), and the final write of a success acknowledges it. So such a job costs
two round trips fewer. A job whose record changed since it was queued (cancelled, routed
again) is decided on the record the failed compare-and-set returns, as any write's.

As with kombu, a worker killed between 1 and 2 loses the message it just took (one round
trip's window, and the few checks before the move to ``running`` for a job that carries its
record); its job stays ``queued`` and the reaper's stranded sweep does not see it.

A thread takes a message only when it is free, so nothing waits in a busy worker's memory
while another worker is idle. Starting or stopping on a queue is local and immediate: the
threads blocked in BRPOP are woken through their wake lists (``mb:wake:<instance>:<n>``),
with no broadcast through the broker. Loads, unloads and pinned jobs (``node.<id>``) stay
with Celery's consumer. While task events are on (``MODELBAY_CELERY_EVENTS``, or Flower's
``enable_events``), each job sends the events Celery's worker would (received, started,
succeeded or failed) through the worker's own dispatcher, so Flower shows it.
"""
from __future__ import annotations

import base64
import logging
import threading
import time
import traceback
from collections.abc import Callable

import orjson
import redis
from celery import Celery
from celery.events.dispatcher import EventDispatcher

from tasks.cas import Note
from tasks.keys import job_key, wake_key
from tasks.names import TASK_INFER
from tasks.publish import PRIORITY_STEPS, SEP, queue_key
from tasks.queues import QueueStore
from tasks.redisconn import BLOCK_MAX_S

log = logging.getLogger("modelbay.worker")

BLOCK_S = BLOCK_MAX_S
"""The longest one BRPOP blocks (seconds): a wake entry or a message ends it sooner. Under
the store's reply timeout with room (:data:`tasks.redisconn.BLOCK_MAX_S`): a BRPOP the
client gives up on may still be handed a message, which is then lost."""
RETRY_S = (0.5, 5.0)
"""The pause after a failed BRPOP (seconds): from the first, doubling up to the second."""


class Message:
    """A task message as kombu's Redis transport stores it: what the taker needs of it."""

    __slots__ = ("tag", "task", "task_id", "headers", "args", "kwargs", "entry", "record")

    def __init__(self, raw: str) -> None:
        """Raises ValueError, KeyError or TypeError when ``raw`` is not a task message."""
        msg = orjson.loads(raw)
        props = msg["properties"]
        body = base64.b64decode(msg["body"]) if props.get("body_encoding") == "base64" else msg["body"]
        args, kwargs, _ = orjson.loads(body)
        info = props.get("delivery_info") or {}
        self.tag = str(props["delivery_tag"])
        self.headers: dict[str, object] = msg["headers"]
        self.task = str(self.headers["task"])
        self.task_id = str(self.headers.get("id", ""))
        self.args: list[object] = list(args)
        self.kwargs: dict[str, object] = dict(kwargs)
        record = msg.get("modelbay_record")  # an inference job's record as queued (tasks.readypath)
        self.record = record if isinstance(record, str) else None
        # kombu's unacked entry: [message, exchange, routing key] (its QoS.append).
        self.entry = (f"[{raw},{orjson.dumps(info.get('exchange', '')).decode()},"
                      f"{orjson.dumps(info.get('routing_key', '')).decode()}]")


class QueueTaker:
    """``threads`` threads consuming this worker's model queues; see the module."""

    def __init__(self, queues: QueueStore, app: Celery, instance: str, threads: int,
                 log_requests: bool = False, events: Callable[[], EventDispatcher | None] = lambda: None,
                 test_hold_s: float = 0.0) -> None:
        """``events``: the worker's task event dispatcher (its consumer's), once there is one.
        ``test_hold_s`` (tests only): seconds between recording a message as taken and its job."""
        self._test_hold_s = test_hold_s
        self._queues = queues
        self._app = app
        self._events = events
        self._log_requests = log_requests
        self._wakes = [wake_key(instance, n) for n in range(max(1, threads))]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._consumed: list[str] = []  # in the order they are tried; the last served goes last
        self._stopping = False
        self._running = 0

    # ---- what is consumed ------------------------------------------------------------

    def consume(self, queue: str) -> None:
        """Start taking from ``queue`` now."""
        with self._lock:
            if queue in self._consumed:
                return
            self._consumed.append(queue)
            self._changed.notify_all()
        self._wake()

    def cancel(self, queue: str) -> None:
        """Stop taking from ``queue``: no thread takes from it once this returns (a thread
        that Redis cannot wake stops within ``BLOCK_S``). A message taken just before runs;
        its model's absence sends it elsewhere (:func:`workers.jobs.tasks.infer`)."""
        with self._lock:
            if queue not in self._consumed:
                return
            self._consumed.remove(queue)
        self._wake()

    def consumed(self) -> list[str]:
        with self._lock:
            return list(self._consumed)

    # ---- start and stop --------------------------------------------------------------

    def start(self) -> None:
        for n in range(len(self._wakes)):
            threading.Thread(target=self._work, args=(n,), name=f"modelbay-taker-{n}", daemon=True).start()

    def stop_taking(self, wake: bool = True) -> None:
        """Take no more messages (the jobs running go on). ``wake``: wake the threads blocked
        in BRPOP now (a round trip); else each stops when its BRPOP returns."""
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        if wake:
            self._wake()

    def busy(self) -> bool:
        """True while a job taken here runs."""
        with self._lock:
            return self._running > 0

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for the running jobs to end; True when none runs."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    # ---- the threads -----------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._queues.wake(self._wakes)
        except redis.RedisError as exc:  # the threads notice within BLOCK_S
            log.warning("could not wake the model queue takers: %s", exc)

    def _keys(self, n: int) -> list[str] | None:
        """The lists thread ``n`` waits on, its wake list first; None once stopping. Waits
        (no Redis) while no queue is consumed."""
        with self._lock:
            while not self._consumed and not self._stopping:
                self._changed.wait()
            if self._stopping:
                return None
            return [self._wakes[n]] + [queue_key(q, p) for p in PRIORITY_STEPS for q in self._consumed]

    def _work(self, n: int) -> None:
        pause_s = RETRY_S[0]
        while (keys := self._keys(n)) is not None:
            try:
                got = self._queues.pop(keys, BLOCK_S)
            except redis.RedisError as exc:  # an outage the store's retries did not ride out
                log.warning("taking from the model queues failed: %s; again in %.1fs", exc, pause_s)
                with self._lock:
                    self._changed.wait_for(lambda: self._stopping, pause_s)
                pause_s = min(pause_s * 2, RETRY_S[1])
                continue
            pause_s = RETRY_S[0]
            if got is None or got[0] == keys[0]:
                continue
            key, raw = got
            with self._lock:
                self._running += 1
                queue = key.split(SEP, 1)[0]
                if queue in self._consumed:  # the queue just served is tried last (kombu's rotation)
                    self._consumed.remove(queue)
                    self._consumed.append(queue)
            try:
                self._run(raw)
            finally:
                with self._lock:
                    self._running -= 1
                    self._changed.notify_all()

    def _run(self, raw: str) -> None:
        try:
            message = Message(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("dropped a model queue message that is not a task message (%s): %.200s", exc, raw)
            return
        infer = message.task == TASK_INFER and bool(message.args) and isinstance(message.args[0], str)
        taken = Taken(self._queues, Note(message.tag, message.entry, time.time()))
        if infer and message.record is not None and not self._test_hold_s:
            message.kwargs["record"] = message.record  # the job's first write records the take
        else:
            record = taken.record(read=job_key(str(message.args[0])) if infer else None)
            if record is not None:
                message.kwargs["record"] = record
        if infer:
            message.kwargs["taken"] = taken
        if self._test_hold_s:  # tests: a window in which to kill this worker
            time.sleep(self._test_hold_s)
        try:
            task = self._app.tasks.get(message.task)
            if task is None:
                log.error("dropped a message of unknown task %r (id %s)", message.task, message.task_id)
                return
            began = time.monotonic()
            if self._log_requests:
                log.info("task %s[%s] taken", message.task, message.task_id)
            events = _TaskEvents.of(self._events(), message)
            try:
                result = task(*message.args, **message.kwargs)
            except Exception as exc:  # acked all the same, as Celery's acks_on_failure_or_timeout
                log.exception("task %s[%s] raised", message.task, message.task_id)
                if events is not None:
                    events.failed(exc)
            else:
                if events is not None:
                    events.succeeded(result, time.monotonic() - began)
                if self._log_requests:  # Celery's own line for a task that succeeded (tests and operators grep it)
                    log.info("Task %s[%s] succeeded in %.3fs", message.task, message.task_id, time.monotonic() - began)
        finally:
            if taken.noted and not taken.acked:
                try:
                    self._queues.drop_taken(message.tag)
                except redis.RedisError as exc:  # restored after the visibility timeout: its route makes it a no-op
                    log.warning("could not acknowledge message %s: %s", message.tag, exc)


class Taken:
    """A message a taker thread took, as its inference task sees it (``taken``). It is
    recorded in kombu's ``unacked`` (``note``) by the taker before the task, or by the job's
    first write (:meth:`claim`); it is acknowledged by the job's final write (``acked``),
    else by the taker once the task returns. Nothing recorded, nothing to acknowledge: a
    task that returns before any write (its job ended meanwhile) leaves no trace."""

    def __init__(self, queues: QueueStore, note: Note) -> None:
        self._queues = queues
        self.note = note
        self.noted = False  # recorded, or handed to a write that may have recorded it
        self.acked = False

    def claim(self) -> Note | None:
        """The note for a write to carry, once (None after that)."""
        if self.noted:
            return None
        self.noted = True
        return self.note

    def record(self, read: str | None = None) -> str | None:
        """Record the message as taken now, if no write did (one round trip); ``read``: a key
        read in the same round trip, whose value is returned."""
        note = self.claim()
        if note is None:
            return None
        try:
            return self._queues.note_taken(note.tag, note.entry, note.at_s, read=read)
        except redis.RedisError as exc:  # it is taken: run it all the same
            log.warning("could not record message %s as taken: %s", note.tag, exc)
            return None

    def ack_tag(self) -> str:
        """The tag for a final write to acknowledge ("" when nothing was recorded)."""
        return self.note.tag if self.noted and not self.acked else ""


class _TaskEvents:
    """The task events Celery's worker sends for a task it runs (received, started, then
    succeeded or failed), for Flower: sent only while the worker's dispatcher is enabled
    (``MODELBAY_CELERY_EVENTS``, or Flower's ``enable_events``)."""

    def __init__(self, dispatcher: EventDispatcher, message: Message) -> None:
        self._send = dispatcher.send
        self._id = message.task_id

    @classmethod
    def of(cls, dispatcher: EventDispatcher | None, message: Message) -> _TaskEvents | None:
        if dispatcher is None or not dispatcher.enabled:
            return None
        events = cls(dispatcher, message)
        h = message.headers
        events._send("task-received", uuid=events._id, name=message.task, args=h.get("argsrepr"),
                     kwargs=h.get("kwargsrepr"), root_id=h.get("root_id"), parent_id=h.get("parent_id"),
                     retries=h.get("retries", 0), eta=None, expires=None)
        events._send("task-started", uuid=events._id)
        return events

    def succeeded(self, result: object, runtime_s: float) -> None:
        self._send("task-succeeded", uuid=self._id, result=repr(result), runtime=runtime_s)

    def failed(self, exc: BaseException) -> None:
        self._send("task-failed", uuid=self._id, exception=repr(exc), traceback=traceback.format_exc())
