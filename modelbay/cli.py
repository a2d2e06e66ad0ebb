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
import urllib.error
from pathlib import Path
from collections.abc import Sequence

from modelbay import gpus, services
from modelbay.commands import add_commands
from modelbay.client import ApiError, Client
from modelbay.stack import LocalStack
from tasks.names import node_queue
from tasks.settings import Settings, SettingsError, env_name, load_settings

DEMO_CATALOG = Path(__file__).with_name("demo_catalog.json")


def cmd_web(args: argparse.Namespace) -> int:
    load_settings()  # fail fast on a bad setting
    os.execv(sys.executable, services.web_command(args.host, args.port, args.workers))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = load_settings()
    concurrency = args.concurrency or settings.worker_threads(len(gpus.visible(gpus.nvml_gpus())))
    os.execv(sys.executable, services.worker_command(node_queue(settings.node_id), settings.node_id, concurrency))
    return 0


def register_catalog(base_url: str, catalog: dict[str, dict], api_key: str | None) -> None:
    client = Client(base_url, api_key, timeout_s=10)
    for name, manifest in catalog.items():
        client.register(name, manifest)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    data = Path(args.data_dir).resolve()
    stack = LocalStack(data / "logs", data, {env_name("models_dir"): str(data / "models"),
                                             env_name("run_dir"): str(data / "run")})
    if env_name("files_url") not in os.environ:  # uploads and batch files: a directory, unless set
        stack.env[env_name("files_url")] = str(data / "files")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (a background job)
    try:
        serve(stack, args)
    except KeyboardInterrupt:
        return 0
    except services.ProcessExited as exc:
        print(f"modelbay: {exc}", file=sys.stderr, flush=True)
        return 1
    except TimeoutError as exc:
        print(f"modelbay: {exc} (see {stack.log_dir})", file=sys.stderr, flush=True)
        return 1
    finally:
        print("\nmodelbay: stopping...", flush=True)
        stack.close(15, report=lambda name, how: print(f"  {name}: {how}", flush=True))
    return 0


def serve(stack: LocalStack, args: argparse.Namespace) -> None:
    """Start the stack, register the catalog and watch the processes; returns never (it
    raises ``ProcessExited`` when one ends)."""
    settings = start_stack(stack, args)
    base = f"http://{args.host}:{args.port}"
    stack.wait_http(f"{base}/readyz", 120, "modelbay web and workers (/readyz)")
    catalog = json.loads(Path(args.catalog).read_text() if args.catalog else DEMO_CATALOG.read_text())
    keys = settings.api_key_list
    register_catalog(base, catalog, keys[0] if keys else None)
    print(f"modelbay is up at {base}  (models: {', '.join(catalog)}; logs: {stack.log_dir})", flush=True)
    if not keys:
        print(f"no MODELBAY_API_KEYS set: listening on {args.host} only", flush=True)
    stack.watch()


def start_stack(stack: LocalStack, args: argparse.Namespace) -> Settings:
    """Valkey and NATS (unless ``MODELBAY_REDIS_URL`` / ``MODELBAY_NATS_URL`` name running
    ones; ``--nats-cluster N``: N routed nats-servers), ``args.workers`` worker nodes
    (``<node id>-<n>`` when more than one, each with its own metrics port and its share of the
    GPUs: :mod:`modelbay.gpus`), then web; the settings they run with."""
    if env_name("redis_url") not in os.environ:
        stack.start_valkey(args.redis_port)
    if env_name("nats_url") not in os.environ:
        if args.nats_cluster > 1:
            stack.start_nats_cluster(args.nats_cluster, args.nats_port)
        else:
            stack.start_nats(args.nats_port)
    settings = load_settings({**os.environ, **stack.env})
    found = gpus.visible(gpus.nvml_gpus())
    for i, plan in enumerate(gpus.worker_plans(settings, args.workers, found, gpus.machine_cpus()), start=1):
        port = settings.worker_metrics_port + i - 1 if settings.worker_metrics_port else 0
        stack.start_worker(plan.node_id, plan.concurrency, {**plan.env, env_name("worker_metrics_port"): str(port)})
    stack.start_web(args.port, args.host, args.web, ready_path=None)
    return settings


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
    up.add_argument("--nats-port", type=int, default=None,
                    help="NATS client port (with --nats-cluster: the first node's; the others follow)")
    up.add_argument("--nats-cluster", type=int, default=1, metavar="N",
                    help="run N nats-server processes routed as one cluster (every process names them all)")
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
    except SettingsError as exc:
        print(f"modelbay: {exc}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"modelbay: cannot reach {getattr(args, 'url', 'the API')}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
