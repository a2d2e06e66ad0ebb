"""The process entry point every backend shares: serve one model on a unix socket.

``python -m workers.backends.<name> --socket PATH --model NAME --instance ID`` ends up in
:func:`main`, which serves the Backend service and grpc.health.v1, stops on SIGTERM/SIGINT
or when the parent (the worker) goes away, and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from workers.backends.servicer import MAX_MESSAGE_BYTES, SERVICE_NAME, BackendServicer, health_socket
from workers.backends.model import BackendModel
from workers.backends.proto.modelbay.backend.v1 import backend_pb2_grpc as pb_grpc

log = logging.getLogger("modelbay.backend")


def main(
    model_factory: Callable[[], BackendModel], argv: Sequence[str] | None = None, *,
    backend_name: str, stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Serve ``--socket``/``--model``/``--instance`` until a stop signal or until the parent
    process goes away; return 0. Logs one line per event to stderr, prefixed
    ``<backend_name>[<pid>]``. In-flight calls get ``--grace-s`` seconds (default 1);
    model code still busy a second after that (a load stuck in native code) does not hold
    the process: it then leaves with ``os._exit``."""
    args = _parser(backend_name).parse_args(argv)
    # Passed by the worker, not read here: a worker SIGKILLed between spawning this process
    # and this line would otherwise leave init as the "parent", and a backend that never stops.
    parent = args.parent_pid or os.getppid()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"{backend_name}[{os.getpid()}] %(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for sig in stop_signals:
        signal.signal(sig, on_signal)
    model = model_factory()
    servers = _Servers(model, args)
    log.info("serving unix:%s for model %r instance %s", args.socket, args.model, args.instance)
    while not stop.wait(0.5):
        if os.getppid() != parent:
            log.warning("parent process %d went away; stopping", parent)
            break
    servers.stop(args.grace_s)
    log.info("stopped")  # gRPC unlinks the socket file on stop (and a stale one on bind)
    _leave_when_model_code_is_stuck()
    return 0


def _parser(backend_name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m workers.backends.{backend_name}")
    parser.add_argument("--socket", required=True, help="unix socket path to serve on")
    parser.add_argument("--model", required=True, help="catalog name of the model")
    parser.add_argument("--instance", required=True, help="unique id of this load")
    parser.add_argument("--grace-s", type=float, default=1.0, help="seconds in-flight calls get on stop")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="the worker's pid (default: the parent at start); the backend stops when it is gone")
    return parser


class _Servers:
    """The Backend service (16 call threads) and grpc.health.v1, started serving."""

    def __init__(self, model: BackendModel, args: argparse.Namespace) -> None:
        self.model = model
        self.executor = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="rpc")
        self.server = grpc.server(self.executor, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        pb_grpc.add_BackendServicer_to_server(BackendServicer(model, args.model, args.instance), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_insecure_port(f"unix:{args.socket}")
        # Health also on a socket of its own with its own threads: answered however busy the
        # 16 call threads are, so the supervisor's hang detection sees load as alive.
        self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_server.add_insecure_port(f"unix:{health_socket(args.socket)}")
        self.health_server.start()
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float) -> None:
        """In-flight calls get ``grace_s`` seconds."""
        self.health.enter_graceful_shutdown()
        self.model.stopping.set()
        self.server.stop(grace_s).wait()
        self.health_server.stop(0).wait()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _leave_when_model_code_is_stuck() -> None:
    """Model code still busy a second after the stop (a load stuck in native code) must not
    hold the process: leave with ``os._exit``."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    deadline = time.monotonic() + 1.0
    for thread in others:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in others):
        log.warning("model code still busy; exiting anyway")
        logging.shutdown()
        os._exit(0)
