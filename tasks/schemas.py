"""Pydantic schemas shared by web/ and workers/: manifests, job requests, job records, errors."""
from __future__ import annotations

from datetime import datetime, UTC
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

JobKind = Literal["load", "unload", "inference"]
JobStatus = Literal["queued", "loading", "running", "succeeded", "failed", "cancelled"]
TaskName = Literal["embed", "generate", "chat", "image"]
# A job's task: a client's, or "batch" (one chunk of a batch's lines, tasks/batches.py), which
# only the batch runner creates.
JobTask = Literal["embed", "generate", "chat", "image", "batch"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"queued", "loading", "running"})
ModelNodeState = Literal["staging", "loading", "ready", "unloading", "failed"]


def utcnow() -> str:
    """Now as ISO 8601 UTC with milliseconds, e.g. ``2026-11-23T13:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileSpec(Strict):
    uri: str = Field(min_length=1, max_length=4096)
    path: str | None = Field(default=None, max_length=1024)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    size: int | None = Field(default=None, ge=0)


class Manifest(Strict):
    """A catalog entry: which backend serves the model and which files it needs."""

    backend: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    files: list[FileSpec] = Field(default_factory=list, max_length=1000)
    options: dict[str, Any] = Field(default_factory=dict)
    memory_mb: int | None = Field(default=None, ge=0)
    keep_alive_s: float | None = Field(default=None, ge=0)
    pinned: bool = False
    # Where the model runs: "cpu" (no GPU, charged to the node's CPU budget), "cuda" (a GPU the
    # worker assigns), or None (a GPU when the node has one). ``gpus``: how many GPUs one
    # backend process spans. ``allow_cpu_fallback``: a backend that comes up on the CPU when
    # it was given a GPU is kept (as a CPU model) instead of failing ``device_unavailable``.
    device: Literal["cpu", "cuda"] | None = None
    gpus: int = Field(default=1, ge=1, le=64)
    allow_cpu_fallback: bool = False
    # Interactive jobs that may wait for this model at once (0: no cap); unset: the setting
    # MODELBAY_MAX_QUEUED_PER_MODEL. Past it, submits answer 429 (batch chunks never count).
    max_queued: int | None = Field(default=None, ge=0)


def model_size_mb(manifest: Manifest) -> int:
    """The memory a model needs, in MiB: ``memory_mb`` if given, else its files' total size."""
    if manifest.memory_mb is not None:
        return manifest.memory_mb
    return -(-sum(f.size or 0 for f in manifest.files) // (1024 * 1024))


def manifest_device(manifest: Manifest) -> tuple[Literal["cpu", "cuda"] | None, str | None]:
    """Where ``manifest`` asks to run: ``("cpu" | "cuda" | None, None)`` from its ``device``,
    else its ``options.device``; or ``(None, problem)`` when it names a GPU by number
    ("cuda:1": the worker assigns GPUs, and each backend process sees only its own), the two
    disagree, or ``options.gpu_count`` is not the manifest's ``gpus`` (the GPUs the worker gives)."""
    count = manifest.options.get("gpu_count")
    if count is not None and count != manifest.gpus:
        return None, (f"options.gpu_count {count!r} is not the manifest's gpus ({manifest.gpus}): the worker gives "
                      f"a backend process \"gpus\" GPUs and tells it gpu_count; set \"gpus\": {count!r} instead")
    option = manifest.options.get("device")
    if option is not None and option not in ("cpu", "cuda"):
        if isinstance(option, str) and option.startswith("cuda:"):
            return None, (f"options.device {option!r} names a GPU, but the worker assigns GPUs (each backend "
                          f"process sees only its own as 'cuda'): use 'cuda', 'cpu', or leave it out")
        return None, f"options.device must be 'cpu' or 'cuda', got {option!r}"
    if manifest.device is not None and option is not None and option != manifest.device:
        return None, f"device {manifest.device!r} and options.device {option!r} disagree"
    return manifest.device or option, None


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=1_000_000)


_INPUT_FOR_TASK: dict[str, str] = {"embed": "a string or a non-empty list of strings", "generate": "a string",
                                   "image": "a string", "chat": "a non-empty list of {role, content} messages"}


def _json_noun(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "null" if value is None else "object"


def _json_kind(value: object) -> str:
    """What a JSON value is, for messages: "a number", "an empty list", "a list of strings"..."""
    if isinstance(value, list):
        nouns = sorted({_json_noun(v) for v in value})
        return f"a list of {' and '.join(n + 's' for n in nouns)}" if nouns else "an empty list"
    noun = _json_noun(value)
    return noun if noun == "null" else f"{'an' if noun == 'object' else 'a'} {noun}"


class JobRequest(Strict):
    """``POST /v1/jobs`` body. ``input`` must fit ``task``: text(s) for embed, text for
    generate and image, a list of chat messages for chat."""

    model: str = Field(min_length=1, max_length=128)
    task: TaskName
    input: str | list[str] | list[ChatMessage]
    params: dict[str, Any] = Field(default_factory=dict)
    node: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Where the job's end event is posted (tasks/webhooks.py), besides MODELBAY_WEBHOOK_URLS.
    callback_url: str | None = Field(default=None, min_length=1, max_length=2048)

    @field_validator("input", mode="before")
    @classmethod
    def _input_fits_task(cls, value: object, info: ValidationInfo) -> object:
        """Check the input's shape against the task before the union is tried, so a wrong one
        says what the task takes instead of what each union member wanted."""
        task = info.data.get("task")
        want = _INPUT_FOR_TASK.get(task) if isinstance(task, str) else None
        if want is None:
            return value  # the task itself is wrong: that is the error to report
        if task == "embed":
            ok = isinstance(value, str) or (isinstance(value, list) and len(value) > 0
                                            and all(isinstance(v, str) for v in value))
        elif task == "chat":
            ok = isinstance(value, list) and len(value) > 0 and all(isinstance(v, (dict, ChatMessage)) for v in value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(f"task {task!r} takes {want}, got {_json_kind(value)}")
        return value

    def input_json(self) -> Any:
        if isinstance(self.input, list):
            return [m.model_dump() if isinstance(m, ChatMessage) else m for m in self.input]
        return self.input


class LoadRequest(Strict):
    """Optional body of ``POST /v1/models/{name}/load`` and ``/unload``."""

    node: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")


class JobProgress(BaseModel):
    phase: str
    # None while the phase has no measurable progress (``loading``: the backend's LoadModel
    # tells nothing until it ends), so no client shows a full bar before the load is done.
    progress: float | None = Field(default=None, ge=0, le=100)
    bytes_done: int | None = None
    bytes_total: int | None = None
    file: str | None = None
    file_index: int | None = None
    files_total: int | None = None
    step: int | None = None
    steps: int | None = None
    message: str | None = None


class JobErrorInfo(BaseModel):
    type: str
    message: str


WebhookStatus = Literal["pending", "delivered", "failed"]


class WebhookState(BaseModel):
    """Where a job's (or batch's) end event stands (:mod:`tasks.webhooks`): ``pending`` until
    every target took it (``delivered``) or one refused it or retries ran out (``failed``,
    ``last_error`` says why). ``attempts``: delivery rounds so far (a round posts to every
    target not yet done); ``done`` and ``refused``: indexes of the targets that took it and of
    those that refused it (``callback_url`` first, then ``MODELBAY_WEBHOOK_URLS`` in order)."""

    status: WebhookStatus = "pending"
    attempts: int = 0
    last_error: str | None = None
    done: list[int] = Field(default_factory=list)
    refused: list[int] = Field(default_factory=list)


class JobRecord(BaseModel):
    """The job as stored in Redis (``job:<id>``) and returned by ``GET /v1/jobs/{id}``.

    ``load_job`` (architecture §6) is the id of the load an inference job waits for;
    ``stream`` is set for jobs whose pieces are streamed (:mod:`tasks.tokens`).
    """

    id: str
    kind: JobKind
    model: str
    task: JobTask | None = None
    node: str | None = None
    status: JobStatus = "queued"
    progress: JobProgress | None = None
    input: Any = None
    params: dict[str, Any] = Field(default_factory=dict)
    result: Any = None
    error: JobErrorInfo | None = None
    attempts: int = 0
    load_job: str | None = None
    stream: bool = False  # the worker writes generated pieces to the job's token stream
    pin: str | None = None  # the node the client pinned the job to (``node`` is where it runs)
    # The worker process (its node ``instance``) running the job; for a load still queued,
    # the instance of the node it was given to (a restarted node's new process does not match).
    runner: str | None = None
    # How many times the job was sent to a queue. Each message carries the number it was sent
    # with; a message with an older number (the job was routed again since) does nothing.
    routed: int = 0
    # The job's number in its model's queue (tasks.modelstats; 0: not counted, e.g. a batch
    # chunk); while it waits, GET /v1/jobs/{id} adds ``queue_position`` (interactive jobs of the
    # model ahead of it) and ``eta_s`` (seconds until it ends, at the model's recent rate).
    queue_seq: int = 0
    queue_position: int | None = None
    eta_s: float | None = None
    callback_url: str | None = None  # the client's webhook target (tasks/webhooks.py)
    webhook: WebhookState | None = None  # set when the job's end is to be posted somewhere
    created_at: str = Field(default_factory=utcnow)
    started_at: str | None = None
    finished_at: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def public(self) -> dict[str, Any]:
        """The API shape (the input is echoed back only for inference jobs)."""
        data = self.model_dump(mode="json")
        if self.kind != "inference":
            data.pop("input", None)
            data.pop("params", None)
        if data.get("webhook"):
            for key in ("done", "refused"):  # the deliverer's own bookkeeping
                data["webhook"].pop(key, None)
        return data


class ModelNode(BaseModel):
    """The state of one model on one node (``GET /v1/models/{name}`` → ``nodes``)."""

    model: str
    node: str
    state: ModelNodeState
    in_flight: int = 0
    last_used: str | None = None
    loaded_at: str | None = None
    load_job: str | None = None
    error: str | None = None
    pid: int | None = None
    socket: str | None = None
    instance: str | None = None
    memory_mb: int = 0


class GpuUsage(BaseModel):
    """One GPU (or MIG instance) of a node, in MiB: ``budget_mb`` is its memory × the
    headroom less the CUDA context of each backend process on it; ``used_mb`` what its models
    take; ``evictable_mb`` what evicting its idle unpinned models (and their processes) frees."""

    uuid: str
    index: int
    name: str = ""
    memory_total_mb: int
    budget_mb: int
    used_mb: int = 0
    evictable_mb: int = 0
    processes: int = 0


class NodeRecord(BaseModel):
    """A worker node as registered in Redis with its heartbeat.

    On a GPU node ``memory_*`` sum its GPUs (each model gets its own GPU: ``gpus`` says
    where one fits) and ``cpu_memory_*`` is the budget of models run on the CPU; on a CPU node
    both are the node's one budget (``MODELBAY_NODE_MEMORY_MB``). All in MiB."""

    id: str
    hostname: str
    celery_hostname: str
    pid: int
    backends: list[str]
    memory_budget_mb: int
    memory_used_mb: int = 0
    memory_evictable_mb: int = 0
    devices: list[dict[str, Any]] = Field(default_factory=list)
    started_at: str
    last_heartbeat: str
    loads_in_flight: int = 0
    draining: bool = False  # stopping: takes no new jobs or loads, finishes the running ones
    instance: str = ""  # unique per worker process: a node id that comes back is a new instance
    gpus: list[GpuUsage] = Field(default_factory=list)
    gpu_process_overhead_mb: int = 0  # charged on a GPU per backend process placed there
    cpu_memory_budget_mb: int | None = None  # None: a record from before per-GPU accounting
    cpu_memory_used_mb: int = 0
    cpu_memory_evictable_mb: int = 0
    device_errors: list[dict[str, Any]] = Field(default_factory=list)  # GPUs NVML could not read


class ErrorBody(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


