"""All modelbay settings, read from ``MODELBAY_*`` environment variables.

Every setting has exactly one default, here. Units are in the names
(``_s`` seconds, ``_mb`` mebibytes). web/, workers/ and the CLI all read
settings through :func:`load_settings`, so ``modelbay up`` and compose agree.

:class:`Settings` is a ``pydantic-settings`` model: pydantic parses and checks each value,
and a bad one fails at start with :class:`SettingsError`, one line per bad variable naming
it, its value and the type it should have. ``Settings(...)`` is its arguments over the
defaults; the environment is read by :func:`load_settings` alone, from the mapping it is
given (``os.environ`` unless a caller passes another).
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tasks.redisurl import RedisUrlError, parse_redis_target

PREFIX = "MODELBAY_"
NODE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def _default_node_id() -> str:
    """A node id that is unique per container without configuration (its hostname)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:48] or "node"


def _env_bool(value: object) -> object:
    """A boolean variable may be padded with spaces, and an empty one means off (``VAR=``)."""
    if isinstance(value, str):
        return value.strip() or False
    return value


# pydantic's bool (1/0, true/false, yes/no, on/off, t/f, y/n, any case), padded or blank.
EnvBool = Annotated[bool, BeforeValidator(_env_bool)]


class SettingsError(ValueError):
    """Settings that do not parse; the message has one line per bad variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  {line}" for line in problems))

    @classmethod
    def from_validation(cls, exc: ValidationError) -> SettingsError:
        problems: list[str] = []
        for error in exc.errors(include_url=False):
            name = str(error["loc"][0]) if error["loc"] else ""
            field = Settings.model_fields.get(name)
            if field is None:  # an override that is no setting (extra="forbid")
                problems.append(f"{name!r} is not a setting")
                continue
            problems.append(f"{env_name(name)}={error['input']!r}: expected {_type_name(field)} "
                            f"({error['msg']})")
        return cls(problems)


def _type_name(field: FieldInfo) -> str:
    annotation = field.annotation
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


class Settings(BaseSettings):
    """Every knob of modelbay. The env var is ``MODELBAY_`` + the upper-cased field name."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="forbid")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Sentinel (docs/reliability.md "Failover"): with MODELBAY_REDIS_URL=sentinel://h1:26379;
    # sentinel://h2:26379 the master these Sentinels monitor under this name; the data nodes'
    # password (or in the URL's first entry) and the Sentinels' own (tasks/redisurl.py).
    redis_sentinel_master: str = ""
    redis_password: str = ""
    redis_sentinel_password: str = ""
    # Replicas that must have a write before it counts (Redis WAIT, at most redis_wait_timeout_ms):
    # a new job's record, its task message and a job's final state, so a job answered 202 and its
    # result survive a failover. 0: off (one Valkey); 1 with Sentinel (docs/reliability.md).
    redis_wait_replicas: int = Field(default=0, ge=0)
    # Under the clients' reply timeout with room (tasks/redisconn.py: SOCKET_TIMEOUT_S 5 s, a
    # blocking command at most BLOCK_MAX_S 3 s), or every WAIT would time out on the client.
    redis_wait_timeout_ms: int = Field(default=1000, ge=1, le=3000)
    # One NATS server, or every server of a NATS cluster comma-separated: each process connects
    # to one (random order) and fails over to the others (tasks/bus.py)
    nats_url: str = "nats://127.0.0.1:4222"
    nats_prefix: str = "modelbay"
    node_id: str = Field(default_factory=_default_node_id, pattern=NODE_ID_PATTERN)
    models_dir: str = "./.modelbay/models"
    run_dir: str = "./.modelbay/run"
    file_roots: str = ""
    # Staging from http(s) refuses loopback, private, link-local and other non-public
    # addresses (also after redirects) unless this is on.
    allow_private_sources: EnvBool = False
    api_keys: str = ""
    # /metrics without a key even when MODELBAY_API_KEYS is set (a scraper inside the cluster)
    metrics_open: EnvBool = False
    # Each worker serves its Prometheus metrics on this port (0: none)
    worker_metrics_port: int = 9400
    # Jobs and records
    job_ttl_s: int = 86400
    jobs_recent_max: int = 10000
    max_body_mb: float = 32.0
    # Files (/v1/files, tasks/filestore.py): where their bytes live, a local directory (a path
    # or file:///path) or s3://bucket/prefix (any S3-compatible store: the standard AWS_*
    # variables, plus the endpoint below for one that is not AWS). Several nodes need S3.
    files_url: str = "./.modelbay/files"
    s3_endpoint_url: str = ""               # empty: AWS itself
    s3_part_mb: int = Field(default=8, ge=5)  # S3 multipart part size (S3's least is 5 MiB)
    max_file_mb: int = 200                    # the largest file an upload may be (413 past it)
    batch_max_lines: int = 50000              # the most requests one batch input file may hold
    # Batches (/v1/batches, workers/jobs/batch.py): lines per chunk job; a batch's completion
    # window (24 h as OpenAI's; shorter for tests); generations run at once within a chat chunk;
    # how long a cancel or an expiry waits for running chunks to write what they did; how long
    # a finished batch's record is kept.
    batch_chunk_lines: int = Field(default=64, ge=1, le=4096)
    batch_completion_window_s: float = Field(default=86400.0, gt=0)
    batch_generate_concurrency: int = Field(default=4, ge=1, le=256)
    batch_cancel_grace_s: float = 5.0
    batch_ttl_s: int = 30 * 86400
    # Request limits (answered 400 naming the field)
    max_inputs: int = 2048              # texts in one embed job, messages in one chat job
    max_input_chars: int = 1_000_000    # characters of one job's input, all texts together
    max_tokens_limit: int = 16384       # the largest max_tokens a job may ask for
    max_image_side_px: int = 2048       # image width and height
    max_image_steps: int = 200          # denoising steps of one image
    max_wait_s: float = 60.0
    load_wait_s: float = 120.0
    # POST /v1/embeddings calls coalesced into shared jobs (web/openai/coalesce.py): per web
    # process and model, calls that arrive while this many of their jobs are on the way wait
    # and go as one job, of at most coalesce_embed_texts texts; 0: every call its own job.
    coalesce_embed_jobs: int = Field(default=2, ge=0)
    coalesce_embed_texts: int = Field(default=256, ge=1)
    # Backpressure and retries (tasks/modelstats.py, tasks/idempotency.py): interactive jobs that
    # may wait per model (0: no cap; a manifest's max_queued overrides), past it a 429 with
    # Retry-After; how long an Idempotency-Key is remembered, and how long a request that finds
    # the key's first request still creating waits for it.
    max_queued_per_model: int = Field(default=0, ge=0)
    idempotency_ttl_s: int = Field(default=86400, ge=1)
    idempotency_wait_s: float = Field(default=10.0, gt=0)
    # Nodes and workers
    node_ttl_s: float = 15.0
    node_memory_mb: int = 16384
    # Per GPU (workers/node/placement.py): a GPU's model budget is its memory × this, less
    # gpu_process_overhead_mb (the CUDA context) for each backend process placed on it.
    gpu_memory_headroom: float = Field(default=0.9, gt=0, le=1)
    gpu_process_overhead_mb: int = Field(default=500, ge=0)
    worker_concurrency: int = 8
    # Unless MODELBAY_WORKER_CONCURRENCY is set, a worker that sees GPUs runs this many job
    # threads per GPU instead (enough concurrent Embed calls to fill a GPU's batches); the
    # one place it is resolved: Settings.worker_threads.
    worker_concurrency_per_gpu: int = Field(default=32, ge=1)
    # CPUs a backend process sizes its threads to (llama.cpp's n_threads); 0: the CPUs it may
    # run on (sched_getaffinity). `modelbay up --workers N` gives each worker CPUs/N.
    backend_cpus: int = Field(default=0, ge=0)
    # A running job whose node's heartbeat expired is requeued, at most this many attempts
    # in all, then failed with node_lost. Each worker looks every reaper_interval_s.
    job_max_attempts: int = 3
    reaper_interval_s: float = 2.0
    # A job waiting in a model queue whose last holder went away (unload, eviction, a crash,
    # a drain, a lost or restarted node), with no load of the model in flight, is routed again
    # at most this long after the queue lost its last consumer (workers/node/stranded.py).
    stranded_s: float = 15.0
    # On SIGTERM a worker stops taking jobs and lets running ones finish this long; then it
    # hands them back to the queue (they run again elsewhere) and unloads its backends.
    worker_stop_grace_s: float = 30.0
    # A worker's Redis commands retry this long through an outage (a Valkey restart).
    redis_outage_s: float = 60.0
    # Comma-separated backend names, or "auto": echo plus each ML backend whose package is
    # installed (found without importing it).
    backends: str = "auto"
    # Default idle time before a model unloads; 0 keeps models loaded until evicted.
    keep_alive_s: float = 0.0
    # A failed load of a model blocks new loads of it for base, 2×base, ... up to max.
    load_cooldown_base_s: float = 10.0
    load_cooldown_max_s: float = 300.0
    # Backend processes
    backend_start_timeout_s: float = 60.0
    backend_stop_grace_s: float = 5.0
    # A backend whose health check fails this many times in a row, one check per interval,
    # each with this timeout, is killed and its model marked failed (a hang, not only a crash).
    backend_health_interval_s: float = 5.0
    backend_health_timeout_s: float = 2.0
    backend_health_failures: int = 3
    # Crash loops: a model whose backend crashes this many times within the window (after
    # loads that succeeded) is put in the load cooldown, and calls get 503 naming the cause.
    backend_crash_limit: int = 3
    backend_crash_window_s: float = 300.0
    backend_crash_cooldown_s: float = 60.0  # the least a crash loop pauses loads
    # The CPU flags the llama-cpp backend decides on (AMX turns weight repacking off), space-
    # separated; empty reads /proc/cpuinfo. For tests, and for a CPU that hides its flags.
    cpu_flags: str = ""
    load_base_timeout_s: float = 60.0
    inference_timeout_s: float = 600.0
    cancel_poll_s: float = 0.1
    # Progress ticks: at most one per interval per operation (leading + trailing edge).
    progress_interval_s: float = 1.0
    # A mirrored operation expires this long after its last event (keepalives every third).
    ops_ttl_s: float = 60.0
    # An operation that failed stays visible this long with its error.
    ops_error_grace_s: float = 10.0
    # Celery
    visibility_timeout_s: int = 7200
    # Celery task events (task-sent from the web, received/started/succeeded from workers):
    # three to four broker publishes per job, about a fifth of a small job's CPU
    # (docs/benchmarks.md). Off by default; Flower turns them on in the workers at run time
    # (its enable_events, every 5 s), and this turns them on from the start.
    celery_events: bool = False
    # A log line per HTTP request (gunicorn's access log) and per task (Celery's "received" and
    # "succeeded"): each costs about a tenth of a small job's CPU in its process.
    log_requests: bool = False
    # How long a web thread waits on a kept-alive connection for its next request after a
    # response, before handing the connection back to gunicorn's poller (web/gthread.py);
    # 0: gunicorn's own gthread behaviour.
    web_linger_ms: float = Field(default=5.0, ge=0, le=1000)
    # Webhooks (tasks/webhooks.py, README "Webhooks"): every job's and batch's end event goes to
    # these URLs (comma-separated) and to the request's callback_url, signed with the secret
    # (whsec_<base64>; empty: unsigned) per Standard Webhooks. A failed post is retried with
    # backoff (base doubling to max, jittered) until retry_s after the end; each post waits
    # timeout_s. Each worker runs ``webhook_deliverers`` delivery threads (0: none), which look
    # for due events every poll_s, and look again at a job still running every recheck_s.
    webhook_urls: str = ""
    webhook_secret: str = ""
    webhook_retry_s: float = Field(default=3600.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_backoff_base_s: float = Field(default=1.0, gt=0)
    webhook_backoff_max_s: float = Field(default=300.0, gt=0)
    webhook_poll_s: float = Field(default=0.5, gt=0)
    webhook_recheck_s: float = Field(default=30.0, gt=0)
    webhook_deliverers: int = Field(default=1, ge=0)
    # Callback URLs on loopback, private or link-local addresses are refused unless this is on.
    allow_private_webhooks: EnvBool = False
    # Tests only: a worker waits this long between a job's end and scheduling its event.
    webhook_test_hold_s: float = Field(default=0.0, ge=0)
    # Tests only: the model queues' taker waits this long between recording a message as taken
    # and running its job (a window in which to kill the worker).
    taker_test_hold_s: float = Field(default=0.0, ge=0)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the arguments: :func:`load_settings` reads the environment it is given."""
        return (init_settings,)

    @property
    def node_queue(self) -> str:
        from tasks.names import node_queue

        return node_queue(self.node_id)

    @property
    def api_key_list(self) -> list[str]:
        """Keys from MODELBAY_API_KEYS: comma-separated, or ``@/path/to/file`` (one per line)."""
        raw = self.api_keys.strip()
        if raw.startswith("@"):
            raw = Path(raw[1:]).read_text().replace("\n", ",")
        return [k.strip() for k in raw.split(",") if k.strip()]

    @property
    def webhook_url_list(self) -> list[str]:
        """The operator's webhook URLs (MODELBAY_WEBHOOK_URLS, comma-separated)."""
        return [u.strip() for u in self.webhook_urls.split(",") if u.strip()]

    @property
    def file_root_list(self) -> list[Path]:
        return [Path(p).resolve() for p in self.file_roots.split(os.pathsep) if p.strip()]

    @property
    def backend_list(self) -> list[str]:
        """The backends this worker offers: MODELBAY_BACKENDS, or with "auto" those of the
        registry (:mod:`tasks.backends`) whose package is installed."""
        if self.backends.strip() == "auto":
            from tasks.backends import installed_backends

            return list(installed_backends())
        return [b.strip() for b in self.backends.split(",") if b.strip()]

    def worker_threads(self, gpu_count: int) -> int:
        """Celery job threads of a worker that sees ``gpu_count`` GPUs: ``worker_concurrency``
        when MODELBAY_WORKER_CONCURRENCY (or an override) sets it, else
        ``worker_concurrency_per_gpu`` x ``gpu_count`` on a GPU node, else
        ``worker_concurrency`` (its CPU default, 8)."""
        if "worker_concurrency" in self.model_fields_set or gpu_count <= 0:
            return self.worker_concurrency
        return self.worker_concurrency_per_gpu * gpu_count

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * 1024 * 1024


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


class _EnvironSource(PydanticBaseSettingsSource):
    """The ``MODELBAY_*`` variables of one environment mapping, as raw strings for pydantic
    to parse. (pydantic-settings' own ``EnvSettingsSource`` reads only ``os.environ``;
    callers and tests pass a mapping of their own.) Names are matched exactly."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[str | None, str, bool]:
        return self.environ.get(env_name(field_name)), field_name, False

    def __call__(self) -> dict[str, str]:
        return {name: self.environ[env_name(name)] for name in self.settings_cls.model_fields
                if env_name(name) in self.environ}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build :class:`Settings` from ``environ`` (default ``os.environ``), then ``overrides``
    (typed values, checked like the variables).

    Raises :class:`SettingsError` (a ``ValueError``) naming every variable that does not parse.
    """
    values: dict[str, object] = {**_EnvironSource(Settings, os.environ if environ is None else environ)(),
                                 **overrides}
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        raise SettingsError.from_validation(exc) from None
    try:
        parse_redis_target(settings.redis_url, settings.redis_sentinel_master, settings.redis_password,
                           settings.redis_sentinel_password)
    except RedisUrlError as exc:
        raise SettingsError(exc.problems) from None
    return settings
