"""A task message written straight onto the broker's list: the job path's one send per job.

``Celery.send_task`` costs about a quarter of the web's CPU per small job (docs/benchmarks.md):
it builds the message through amqp's task sender, takes a producer from the pool, declares the
queue's binding, runs kombu's publish with its retry wrappers and then the channel's ``_put``.
What lands in Valkey is one ``LPUSH`` of a JSON document. :func:`task_message` builds that
same document (Celery's task protocol 2 with a JSON body, as kombu's Redis transport stores it)
and :meth:`tasks.queues.QueueStore.push` writes it, so a real Celery worker consumes it as any
other message: acked late, restored after the visibility timeout, counted in the queue depth.
``tests/test_unit_publish.py`` holds it equal to what ``send_task`` writes.

Only the hot path uses it (:meth:`tasks.dispatch.Dispatcher.route`), and only while Celery's
task events are off: with ``MODELBAY_CELERY_EVENTS`` on, ``send_task`` also emits the
``task-sent`` event Flower shows.
"""
from __future__ import annotations

import base64
import os
import socket
import uuid
from bisect import bisect
from collections.abc import Mapping, Sequence

import orjson

SEP = "\x06\x16"
"""kombu's Redis transport: between a queue's name and its priority in the list's key."""
PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's Redis transport's default ``priority_steps``: the lists a queue is spread over."""
_HOST = socket.gethostname()
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def queue_key(queue: str, priority: int = 0) -> str:
    """The list that holds ``queue``'s messages of ``priority`` (kombu's ``_q_for_pri``)."""
    step = PRIORITY_STEPS[bisect(PRIORITY_STEPS, priority) - 1]
    return f"{queue}{SEP}{step}" if step else queue


def task_message(name: str, args: Sequence[object], kwargs: Mapping[str, object], queue: str,
                 priority: int = 0, task_id: str | None = None) -> bytes:
    """The document ``send_task(name, args, kwargs, queue=queue, priority=priority)`` pushes:
    headers as Celery's ``as_task_v2`` makes them, the body JSON ``[args, kwargs, embed]``
    base64-encoded, the delivery properties kombu's channel adds (a fresh delivery tag)."""
    task_id = task_id or str(uuid.uuid4())
    headers = {
        "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
        "root_id": task_id, "parent_id": None, "argsrepr": repr(list(args)), "kwargsrepr": repr(dict(kwargs)),
        "origin": f"gen{os.getpid()}@{_HOST}", "ignore_result": None, "replaced_task_nesting": 0,
        "stamped_headers": None, "stamps": {},
    }
    body = orjson.dumps([list(args), dict(kwargs), _EMBED])
    return orjson.dumps({
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": priority,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    })
