"""Regenerate the committed gRPC stubs for the backend contract.

Run ``python -m workers.backends.proto`` from the repository root (or anywhere once the
project is installed). It runs, in the repository root, exactly::

    python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \\
        workers/backends/proto/modelbay/backend/v1/backend.proto

The generated ``backend_pb2.py``, ``backend_pb2.pyi`` and ``backend_pb2_grpc.py`` are
committed next to the proto; regenerate them whenever the proto changes. The stubs check
at import time that the installed grpcio/protobuf are at least the versions of the
grpcio-tools that generated them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO = "workers/backends/proto/modelbay/backend/v1/backend.proto"

# workers/backends/proto/__main__.py -> parents[3] is the repository root.
REPO_ROOT = Path(__file__).resolve().parents[3]


def command() -> list[str]:
    """The protoc command line, to run with the repository root as the working directory."""
    return [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        "--python_out=.",
        "--grpc_python_out=.",
        "--pyi_out=.",
        PROTO,
    ]


def main() -> int:
    """Run protoc; return its exit status."""
    cmd = command()
    print("+ (cd %s && python %s)" % (REPO_ROOT, " ".join(cmd[1:])), file=sys.stderr)
    return subprocess.run(cmd, cwd=REPO_ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
