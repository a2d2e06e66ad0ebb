"""Every Redis key modelbay writes, named in one place (the store's modules import them).

Keys (all under ``mb:``):

- ``mb:job:<id>``             job record JSON; terminal records expire after ``job_ttl_s``
- ``mb:jobev:<id>``           pub/sub channel, one message per transition: the new status; a
                              terminal one of at most ``EVENT_RECORD_MAX_BYTES`` adds a newline
                              and the record's JSON, so a waiter need not read it back
- ``mb:jobs``                 sorted set of job ids by creation time (seconds)
- ``mb:catalog``              hash model name → manifest JSON
- ``mb:catalog:created``      hash model name → first registration time (epoch seconds)
- ``mb:node:<id>``            node record JSON, expires ``node_ttl_s`` after the last heartbeat
- ``mb:nodes``                set of node ids seen and not yet found gone by the reaper
                              (:meth:`tasks.nodestore.NodeStore.gone_nodes`)
- ``mb:nodemodels:<id>``      hash model name → :class:`tasks.schemas.ModelNode` JSON for that node
- ``mb:sf:load:<node>:<tok>`` single-flight: the id of the load in flight for (model, node)
- ``mb:waiters:<load id>``    set of inference job ids waiting for that load
- ``mb:ops``                  set of load and unload job ids not yet terminal (the operations
                              baseline of ``GET /api/operations``)
- ``mb:ops:ver``              counter bumped whenever ``mb:ops`` gains or loses a member
- ``mb:tok:<id>``             the token stream of a streaming job (:mod:`tasks.tokens`)
- ``mb:inflight``             set of inference job ids in ``running`` (the reaper's index)
- ``mb:cooldown:<tok>``       a model's failed loads and the end of its load cooldown (JSON)
- ``mb:crashes:<tok>``        sorted set of a ready model's backend crash times (epoch seconds;
                              :mod:`workers.node.crashes`)
- ``mb:reaper``               lock: the one worker that reaps this round (:mod:`workers.node.reaper`)
- ``mb:orphans``              sorted set model name → epoch seconds at which a node last stopped
                              holding it (ZADD GT: it only moves later)
- ``mb:rescue``               set (with an expiry) while lost workers' taken messages are looked at
- ``mb:gone``                 hash node id → epoch seconds when the reaper first found it gone
                              (a heartbeat clears it; :mod:`workers.node.stranded`)
- ``mb:wake:<instance>:<n>``  list: a worker process's taker thread ``n`` wakes when it gets an
                              entry (its model queues changed, or it stops; expires after a minute;
                              :mod:`workers.node.taker`)
- ``mb:file:<id>``            a file's record JSON (:class:`tasks.files.FileObject`; its bytes are
                              in the file store, never in Redis)
- ``mb:files``                sorted set of file ids by creation time (epoch seconds)
- ``mb:batch:<id>``           a batch's record JSON (:class:`tasks.batches.BatchRecord`)
- ``mb:batches``              sorted set of batch ids by creation time (epoch seconds)
- ``mb:batches:active``       set of batch ids not yet in a final state (the reaper's round looks at them)
- ``mb:batch:<id>:jobs``      hash chunk index → the chunk's job id
- ``mb:batch:<id>:done``      hash chunk index → that chunk's counts JSON, once its part is written
- ``mb:batch:<id>:closed``    set when finalizing starts: a chunk that ends later is not counted
- ``mb:batch:<id>:lease``     the worker that advances the batch now (expires)
- ``mb:mq:<tok>``             a model's queue counters: enq, started, gone (:mod:`tasks.modelstats`)
- ``mb:mstat:<tok>``          a model's throughput reports, one per node per heartbeat (zset by time)
- ``mb:idem:<scope>:<hash>``  an Idempotency-Key: pending, then the id it created (:mod:`tasks.idempotency`)
- ``mb:webhooks``              sorted set ``job:<id>`` / ``batch:<id>`` → epoch seconds when its end event
                              is next looked at (the webhook outbox, :mod:`tasks.webhooks`)
- ``mb:repl:barrier``         a counter written before ``WAIT`` so the wait covers this
                              client's earlier writes on any connection (:meth:`tasks.store.Store.replicated`)

``<tok>`` is :func:`tasks.names.model_token` of the model name. Outside ``mb:``, the store
reads keys of kombu's Redis transport: each Celery queue is a list named after it
(:func:`tasks.names.model_queue`, :func:`tasks.names.node_queue`), and taken, unacknowledged
messages sit in :data:`UNACKED` (their delivery times in :data:`UNACKED_INDEX`).
"""
from __future__ import annotations

from tasks.names import model_token

P = "mb:"

JOBS = f"{P}jobs"
JOB_CHANNEL_PATTERN = f"{P}jobev:*"
EVENT_RECORD_MAX_BYTES = 64 * 1024  # a terminal record up to this size travels in its event
CATALOG = f"{P}catalog"
CATALOG_CREATED = f"{P}catalog:created"
NODES = f"{P}nodes"
OPS = f"{P}ops"
OPS_VER = f"{P}ops:ver"
INFLIGHT = f"{P}inflight"
REAPER_LOCK = f"{P}reaper"
ORPHANS = f"{P}orphans"
RESCUE = f"{P}rescue"
GONE = f"{P}gone"
FILES = f"{P}files"
BATCHES = f"{P}batches"
BATCHES_ACTIVE = f"{P}batches:active"
REPL_BARRIER = f"{P}repl:barrier"
WEBHOOKS_DUE = f"{P}webhooks"
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's Redis transport (its defaults)


def job_key(job_id: str) -> str:
    return f"{P}job:{job_id}"


def job_channel(job_id: str) -> str:
    return f"{P}jobev:{job_id}"


def node_key(node_id: str) -> str:
    return f"{P}node:{node_id}"


def node_models_key(node_id: str) -> str:
    return f"{P}nodemodels:{node_id}"


def load_flight_key(node_id: str, model: str) -> str:
    return f"{P}sf:load:{node_id}:{model_token(model)}"


def waiters_key(load_job_id: str) -> str:
    return f"{P}waiters:{load_job_id}"


def stream_key(job_id: str) -> str:
    return f"{P}tok:{job_id}"


def cooldown_key(model: str) -> str:
    return f"{P}cooldown:{model_token(model)}"


def crashes_key(model: str) -> str:
    return f"{P}crashes:{model_token(model)}"


def file_key(file_id: str) -> str:
    return f"{P}file:{file_id}"


def batch_key(batch_id: str, part: str = "") -> str:
    """``mb:batch:<id>``, or with ``part`` (jobs, done, closed, lease) ``mb:batch:<id>:<part>``."""
    return f"{P}batch:{batch_id}" + (f":{part}" if part else "")


def model_counts_key(model: str) -> str:
    return f"{P}mq:{model_token(model)}"


def model_stats_key(model: str) -> str:
    return f"{P}mstat:{model_token(model)}"


def wake_key(instance: str, thread: int) -> str:
    return f"{P}wake:{instance}:{thread}"


def idempotency_key(scope: str, digest: str) -> str:
    return f"{P}idem:{scope}:{digest}"
