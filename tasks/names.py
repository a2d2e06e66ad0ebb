"""Task names, queue names and the reversible model-token encoding (architecture §3).

Model names may contain ``/ . : @ + -``; queue names and NATS subjects may not.
A token keeps ``[A-Za-z0-9-]`` as is and writes every other byte as ``_XX``
(two lowercase hex digits), so it contains only ``[A-Za-z0-9_-]`` and decodes
back exactly.
"""
from __future__ import annotations

import re

TASK_LOAD = "modelbay.load"
TASK_UNLOAD = "modelbay.unload"
TASK_INFER = "modelbay.infer"
TASK_NOOP = "modelbay.noop"
TASK_BATCH_ADVANCE = "modelbay.batch.advance"  # validate and split, or finalize, a batch

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9/.:@+_-]{0,127}")
_TOKEN_RE = re.compile(r"(?:[A-Za-z0-9-]|_[0-9a-f]{2})+")


def model_token(name: str) -> str:
    """Encode a model name into ``[A-Za-z0-9_-]+``, reversibly."""
    out: list[str] = []
    for byte in name.encode("utf-8"):
        ch = chr(byte)
        out.append(ch if (ch.isascii() and (ch.isalnum() or ch == "-")) else f"_{byte:02x}")
    return "".join(out)


def model_from_token(token: str) -> str:
    """Decode :func:`model_token`. Raises ``ValueError`` for a string that is not a token."""
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"not a model token: {token!r}")
    data = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "_":
            data.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            data.append(ord(token[i]))
            i += 1
    return data.decode("utf-8")


def invalid_model_name(name: str) -> str | None:
    """Why ``name`` is not an allowed model name, or None when it is allowed."""
    if not MODEL_NAME_RE.fullmatch(name):
        return "model names are 1-128 characters of [A-Za-z0-9/.:@+_-] starting with a letter or digit"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "model names may not contain empty, '.' or '..' path segments"
    if parts[-1] in ("load", "unload"):
        return "a model name may not end with '/load' or '/unload'"
    return None


def node_queue(node_id: str) -> str:
    return f"node.{node_id}"


def model_queue(name: str) -> str:
    return f"model.{model_token(name)}"


def progress_subject(prefix: str, kind: str, key: str) -> str:
    """``<prefix>.staging.<model token>.progress``, ``<prefix>.load.<token>.progress`` or
    ``<prefix>.jobs.<job id>.progress`` (architecture §5). ``kind`` is staging, loading, unloading or
    inference; ``key`` is the model name (staging/loading/unloading) or the job id."""
    if kind == "staging":
        return f"{prefix}.staging.{model_token(key)}.progress"
    if kind in ("loading", "unloading"):
        return f"{prefix}.load.{model_token(key)}.progress"
    return f"{prefix}.jobs.{key}.progress"


def cancel_subject(prefix: str, job_id: str) -> str:
    return f"{prefix}.jobs.{job_id}.cancel"


def progress_wildcards(prefix: str) -> list[str]:
    return [f"{prefix}.staging.*.progress", f"{prefix}.load.*.progress", f"{prefix}.jobs.*.progress"]
