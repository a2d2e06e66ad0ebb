"""The operator commands of ``modelbay``: ``models``, ``load``, ``run``, ``jobs``, ``cancel``,
``nodes``, against ``--url`` (or ``MODELBAY_URL``) with ``--api-key`` (or the first key of
``MODELBAY_API_KEYS``).

``load NAME --wait`` follows the load on the operations stream (``/api/operations/stream``)
with a progress bar: bytes, rate, ETA and the file being staged. On a terminal it is a rich
progress bar; otherwise one plain line per update, which logs and tests can read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

from modelbay.client import ApiError, Client
from tasks.settings import load_settings


def _client(args: argparse.Namespace) -> Client:
    key = args.api_key
    if key is None:
        keys = load_settings().api_key_list
        key = keys[0] if keys else None
    return Client(args.url, key)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned table on stdout."""
    cells = [[str(r.get(c) if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def cmd_models(args: argparse.Namespace) -> int:
    models = _client(args).call("GET", "/v1/models")["data"]
    rows = [{"id": m["id"], "backend": m["backend"], "status": m["status"],
             "nodes": ",".join(f"{n['node']}:{n['state']}" for n in m["nodes"]) or None} for m in models]
    _table(rows, ["id", "backend", "status", "nodes"])
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    nodes = _client(args).call("GET", "/v1/nodes")["data"]
    rows = [{"id": n["id"], "host": n["hostname"], "memory": f"{n['memory_used_mb']}/{n['memory_budget_mb']} MB",
             "models": ",".join(m["model"] for m in n.get("models", [])) or None,
             "draining": "yes" if n.get("draining") else None, "heartbeat": n["last_heartbeat"]} for n in nodes]
    _table(rows, ["id", "host", "memory", "models", "draining", "heartbeat"])
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    query = "&".join(f"{k}={v}" for k, v in (("model", args.model), ("status", args.status),
                                             ("limit", args.limit)) if v)
    jobs = _client(args).call("GET", f"/v1/jobs?{query}")["data"]
    _table([{**j, "error": (j.get("error") or {}).get("type")} for j in jobs],
           ["id", "kind", "model", "task", "node", "status", "error", "created_at"])
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _client(args).call("DELETE", f"/v1/jobs/{args.id}")
    print(f"{job['id']} {job['status']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    client = _client(args)
    value: Any = args.input
    if args.task == "chat":
        value = [{"role": "user", "content": args.input}]
    elif args.task == "embed" and args.input.startswith("["):
        value = json.loads(args.input)
    body = {"model": args.name, "task": args.task, "input": value, "params": json.loads(args.params or "{}")}
    headers = {"X-Modelbay-Node": args.node} if args.node else None
    job = client.wait(client.call("POST", "/v1/jobs", body, headers), wait_s=30)
    if job["status"] == "succeeded":
        print(json.dumps(job["result"], indent=2))
        return 0
    print(f"modelbay: {job_error(job)}", file=sys.stderr)
    return 1


def job_error(job: dict[str, Any]) -> str:
    """``<code>: <message> (job <id> <status>)`` for a job that ended without a result, like
    the ``modelbay: <http status> <code>: <message>`` line of an API error."""
    error = job.get("error") or {}
    code = error.get("type") or job["status"]
    message = error.get("message") or f"the job was {job['status']}"
    return f"{code}: {message} (job {job['id']} {job['status']})"


def cmd_load(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.load(args.name, args.node)
    if job is None:  # 200: already loaded
        print(f"{args.name} is ready")
        return 0
    print(f"load {job['id']} of {args.name} on {job.get('node')}: {job['status']}", flush=True)
    if not args.wait:
        return 0
    final = follow(client, job["id"], args.name)
    print(f"load {final['id']}: {final['status']}"
          + (f" ({final['error']['type']}: {final['error']['message']})" if final.get("error") else ""))
    return 0 if final["status"] == "succeeded" else 1


def follow(client: Client, job_id: str, name: str) -> dict[str, Any]:
    """Show the load's progress from the operations stream until the job ends. The job
    record says when it ended (a long poll here); the stream, read on a thread of its own,
    only feeds the display, so its quiet spells (it sends only changes) never hold us up."""
    show = _RichBar(name) if sys.stdout.isatty() else _Lines()
    lock, stop = threading.Lock(), threading.Event()

    def update(row: dict[str, Any]) -> None:
        with lock:
            if not stop.is_set():
                show.update(row)

    def read_stream() -> None:
        while not stop.is_set():
            try:
                for rows in client.operations():
                    row = next((r for r in rows if r.get("id") == job_id), None)
                    if row is not None:
                        update(row)
                    if stop.is_set():
                        return
            except (TimeoutError, OSError, ApiError):
                stop.wait(0.5)

    threading.Thread(target=read_stream, name="modelbay-cli-ops", daemon=True).start()
    try:
        job = client.wait(client.job(job_id), wait_s=10)
    finally:
        with lock:
            stop.set()
            show.close()
    return job


class _Lines:
    """One line per progress update (not a terminal)."""

    def __init__(self) -> None:
        self.last: tuple[Any, ...] | None = None

    def update(self, row: dict[str, Any]) -> None:
        key = (row.get("phase"), row.get("file_index"), row.get("bytes_done"))
        if key == self.last:
            return
        self.last = key
        print(describe(row), flush=True)

    def close(self) -> None:
        pass


class _RichBar:
    """A rich progress bar: bytes, rate, ETA, the file being staged."""

    def __init__(self, name: str) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn())
        self.task = self.progress.add_task(name, total=None)
        self.unmeasured = False
        self.progress.start()

    def update(self, row: dict[str, Any]) -> None:
        if row.get("progress") is None:  # loading: no percentage, a pulsing bar (rich's total=None)
            if not self.unmeasured:
                self.unmeasured = True
                self.progress.remove_task(self.task)
                self.task = self.progress.add_task(describe(row), total=None)
            return
        self.unmeasured = False
        file = f" {row.get('file_index')}/{row.get('files_total')} {row.get('file')}" if row.get("file") else ""
        self.progress.update(self.task, description=f"{row.get('phase')}{file}",
                             completed=row.get("bytes_done") or 0, total=row.get("bytes_total"))

    def close(self) -> None:
        self.progress.stop()


def describe(row: dict[str, Any]) -> str:
    """``staging 1/2 weights.bin 3.1/10.0 MB 1.2 MB/s ETA 6s 31.0%`` from an operations row;
    ``loading…`` alone in a phase without a percentage (``progress`` null)."""
    done, total = row.get("bytes_done"), row.get("bytes_total")
    phase = str(row.get("phase") or row.get("kind"))
    if row.get("progress") is None:
        return f"{phase}…"
    parts = [phase]
    if row.get("file"):
        parts.append(f"{row.get('file_index')}/{row.get('files_total')} {row['file']}")
    if done is not None:
        parts.append(f"{(done or 0) / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB")
    if row.get("rate_bps"):
        parts.append(f"{row['rate_bps'] / 1e6:.1f} MB/s")
    if row.get("eta_s") is not None:
        parts.append(f"ETA {row['eta_s']:.0f}s")
    parts.append(f"{row.get('progress') or 0:.1f}%")
    return " ".join(parts)


def add_commands(sub: Any) -> None:
    """Register the operator commands on the ``modelbay`` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("MODELBAY_URL", "http://127.0.0.1:8080"),
                        help="the API (default: MODELBAY_URL or http://127.0.0.1:8080)")
    common.add_argument("--api-key", default=None, help="bearer key (default: first of MODELBAY_API_KEYS)")
    sub.add_parser("models", parents=[common], help="list the catalog and where models are loaded"
                   ).set_defaults(func=cmd_models)
    sub.add_parser("nodes", parents=[common], help="list the worker nodes").set_defaults(func=cmd_nodes)
    jobs = sub.add_parser("jobs", parents=[common], help="list recent jobs")
    jobs.add_argument("--model")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(func=cmd_jobs)
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_cancel)
    load = sub.add_parser("load", parents=[common], help="load a model (and follow its progress)")
    load.add_argument("name")
    load.add_argument("--node", help="pin the load to this node")
    load.add_argument("--wait", action="store_true", help="follow the load with a progress bar until it ends")
    load.set_defaults(func=cmd_load)
    run = sub.add_parser("run", parents=[common], help="run one job and print its result")
    run.add_argument("name")
    run.add_argument("--task", required=True, choices=["embed", "generate", "chat", "image"])
    run.add_argument("--input", required=True, help="text (embed: a JSON list for several texts)")
    run.add_argument("--params", help="job params as JSON, e.g. '{\"max_tokens\": 16}'")
    run.add_argument("--node", help="pin the job to this node")
    run.set_defaults(func=cmd_run)
