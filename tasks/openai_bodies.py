"""A finished job's result turned into the OpenAI response body: one place for the synchronous
routes (web/openai/routes.py) and the batch runner (workers/jobs/batch.py), so a batch line's
``response.body`` is what the route answers for the same request (its ``id`` and ``created``
are its own, as with any two calls).
"""
from __future__ import annotations

import base64
import struct
import time
from typing import Any

JsonObject = dict[str, Any]


def usage_of(result: JsonObject) -> dict[str, int]:
    """``usage`` of a generation: prompt, completion and total tokens."""
    usage = result.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def embeddings_body(model: str, result: JsonObject, encoding_format: str = "float") -> JsonObject:
    """``POST /v1/embeddings``'s body for an embed job's ``result`` (vectors as float lists,
    or with ``encoding_format`` "base64" as little-endian float32 bytes in base64)."""
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if encoding_format == "base64"
             else v} for i, v in enumerate(result.get("embeddings", []))]
    prompt = int((result.get("usage") or {}).get("prompt_tokens", 0))
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def completion_body(job_id: str, model: str, result: JsonObject, chat: bool) -> JsonObject:
    """``POST /v1/chat/completions``' (``chat``) or ``/v1/completions``' body for a generation's
    ``result``; its id is ``chatcmpl-``/``cmpl-`` and the job's id, ``created`` now (epoch s)."""
    finish = result.get("finish_reason") or "stop"
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.get("text", "")},
                  "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": result.get("text", ""), "logprobs": None, "finish_reason": finish}
    return {"id": ("chatcmpl-" if chat else "cmpl-") + job_id,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage_of(result)}
