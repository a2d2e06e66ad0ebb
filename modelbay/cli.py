"""The ``modelbay`` command: ``up`` (the whole stack as processes), ``web``, ``worker``, and
the operator commands of :mod:`modelbay.commands` (``models``, ``load``, ``run``, ``jobs``,
``cancel``, ``nodes``) that talk to a running API.

The CLI imports neither Flask, Celery's worker nor grpc.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Sequence

from modelbay import services
from modelbay.commands import add_commands
from modelbay.client import ApiError, Client, quote_name
from tasks.names import node_queue
from tasks.settings import env_name, load_settings

DEMO_CATALOG = Path(__file__).with_name("demo_catalog.json")


def cmd_web(args: argparse.Namespace) -> int:
    load_settings()  # fail fast on a bad setting
    os.execv(sys.executable, services.web_command(args.host, args.port, args.workers))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = load_settings()
    concurrency = args.concurrency or settings.worker_concurrency
    os.execv(sys.executable, services.worker_command(node_queue(settings.node_id), settings.node_id, concurrency))
    return 0


def register_catalog(base_url: str, catalog: dict[str, dict], api_key: str | None) -> None:
    client = Client(base_url, api_key, timeout_s=10)
    for name, manifest in catalog.items():
        client.call("PUT", f"/v1/models/{quote_name(name)}", manifest)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    data = Path(args.data_dir).resolve()
    (data / "logs").mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {env_name("models_dir"): str(data / "models"),
                           env_name("run_dir"): str(data / "run")}
    started: list[services.Started] = []
    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print("\nmodelbay: stopping...", flush=True)
        for one in reversed(started):
            how = services.stop_process(one.proc, grace_s=15)
            print(f"  {one.name}: {how}", flush=True)

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (a background job)
    try:
        if env_name("redis_url") not in os.environ:
            valkey = services.start_valkey(data / "valkey", args.redis_port, log_path=data / "logs/valkey.log")
            started.append(services.Started("valkey", valkey.proc, data / "logs/valkey.log"))
            env[env_name("redis_url")] = valkey.url
        if env_name("nats_url") not in os.environ:
            nats = services.start_nats(args.nats_port, log_path=data / "logs/nats.log")
            started.append(services.Started("nats", nats.proc, data / "logs/nats.log"))
            env[env_name("nats_url")] = nats.url
        settings = load_settings({**os.environ, **env})
        for i in range(1, args.workers + 1):
            node = f"{settings.node_id}-{i}" if args.workers > 1 else settings.node_id
            port = settings.worker_metrics_port + i - 1 if settings.worker_metrics_port else 0
            log_path = data / f"logs/worker-{node}.log"
            proc = services.spawn(services.worker_command(node_queue(node), node, settings.worker_concurrency),
                                  {**env, env_name("node_id"): node, env_name("worker_metrics_port"): str(port)},
                                  log_path)
            started.append(services.Started(f"worker {node}", proc, log_path))
        web = services.spawn(services.web_command(args.host, args.port, args.web), env, data / "logs/web.log")
        started.append(services.Started("web", web, data / "logs/web.log"))
        base = f"http://{args.host}:{args.port}"
        services.wait_until(lambda: services.raise_if_exited(started) or _ready(f"{base}/readyz"), 120,
                            "modelbay web and workers (/readyz)")
        catalog = json.loads(Path(args.catalog).read_text()) if args.catalog else json.loads(DEMO_CATALOG.read_text())
        keys = settings.api_key_list
        register_catalog(base, catalog, keys[0] if keys else None)
        print(f"modelbay is up at {base}  (models: {', '.join(catalog)}; logs: {data / 'logs'})", flush=True)
        if not keys:
            print(f"no MODELBAY_API_KEYS set: listening on {args.host} only", flush=True)
        while True:
            services.raise_if_exited(started)
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except services.ProcessExited as exc:
        print(f"modelbay: {exc}", file=sys.stderr, flush=True)
        return 1
    except TimeoutError as exc:
        print(f"modelbay: {exc} (see {data / 'logs'})", file=sys.stderr, flush=True)
        return 1
    finally:
        stop_all()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelbay", description="A job-queue model server.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run valkey, nats, workers and web as local processes")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--web", type=int, default=1, help="web worker processes (replicas)")
    up.add_argument("--port", type=int, default=8080)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--catalog", help="a JSON file {name: manifest}; default: the demo catalog")
    up.add_argument("--data-dir", default="./.modelbay")
    up.add_argument("--redis-port", type=int, default=None)
    up.add_argument("--nats-port", type=int, default=None)
    up.set_defaults(func=cmd_up)
    web = sub.add_parser("web", help="run the HTTP API under gunicorn")
    web.add_argument("--port", type=int, default=8080)
    web.add_argument("--host", default="0.0.0.0")
    web.add_argument("--workers", type=int, default=2)
    web.set_defaults(func=cmd_web)
    worker = sub.add_parser("worker", help="run a Celery worker node")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.set_defaults(func=cmd_worker)
    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ApiError as exc:
        print(f"modelbay: {exc}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"modelbay: cannot reach {getattr(args, 'url', 'the API')}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
