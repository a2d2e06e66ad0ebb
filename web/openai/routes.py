"""OpenAI-compatible routes: each call runs one modelbay job and waits for it (embeddings calls
of one caller and model may share a job under load: web/openai/shared.py).

``POST /v1/embeddings``, ``/v1/completions``, ``/v1/chat/completions`` (``stream: true`` as
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``) and
``/v1/images/generations`` (``b64_json``). Responses carry ``X-Modelbay-Job`` and
``X-Modelbay-Node``; errors use the one envelope, which is OpenAI's shape.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, stream_with_context

from tasks.openai_bodies import completion_body, embeddings_body, usage_of
from web.openai.protocol import (ChatCompletionRequest, CompletionRequest, EmbeddingsRequest, ImageRequest,
                                 Sampling, parse)
from web.openai.serving import Call, ClientGone, RespondAsync, job_error
from web.openai.shared import embed_call
from web.openapi import EXAMPLE_MODEL, Ok, documented
from tasks.schemas import JobRecord
from web.schemas_http import ChatCompletion, Completion, EmbeddingList, Images

bp = Blueprint("openai", __name__, url_prefix="/v1")

CALL_ERRORS = (400, 404, 409, 413, 415, 422, 429, 503)  # documented() adds 401
CALL_HEADERS = ("X-Modelbay-Job", "X-Modelbay-Node", "Idempotent-Replayed")
# Prefer: respond-async (RFC 7240): the job, queued, as POST /v1/jobs answers it
QUEUED = Ok(202, JobRecord, "queued (`Prefer: respond-async`); poll `Location`",
            headers=("Location", "X-Modelbay-Job", "Preference-Applied"))
STREAMED = "the completion; with `stream` server-sent chunks ending with `data: [DONE]`"


@bp.post("/embeddings")
@documented("openai", "Embeddings (OpenAI-compatible)", Ok(200, EmbeddingList, "the vectors", headers=CALL_HEADERS), QUEUED,
            errors=CALL_ERRORS, idempotent=True, prefer_async=True, body=EmbeddingsRequest, pin=True,
            example={"model": EXAMPLE_MODEL, "input": ["hello", "world"]})
def embeddings():
    req = parse(EmbeddingsRequest)
    call = embed_call(req.model, req.input)  # calls may share a job under load (web/openai/shared.py)
    call.wait()
    body = embeddings_body(req.model, call.result(), req.encoding_format)
    return jsonify(body), 200, call.headers


@bp.post("/completions")
@documented("openai", "Text completion (OpenAI-compatible)",
            Ok(200, Completion, STREAMED, stream=True, headers=CALL_HEADERS), QUEUED, errors=CALL_ERRORS,
            idempotent=True, prefer_async=True,
            body=CompletionRequest, pin=True,
            example={"model": EXAMPLE_MODEL, "prompt": "one two three", "max_tokens": 2})
def completions():
    req = parse(CompletionRequest)
    call = Call(req.model, "generate", req.text(), req.params(), stream=req.stream, input_name="prompt")
    return _generate(req, call, chat=False)


@bp.post("/chat/completions")
@documented("openai", "Chat completion (OpenAI-compatible)",
            Ok(200, ChatCompletion, STREAMED, stream=True, headers=CALL_HEADERS), QUEUED, errors=CALL_ERRORS,
            idempotent=True, prefer_async=True,
            body=ChatCompletionRequest, pin=True,
            example={"model": EXAMPLE_MODEL, "messages": [{"role": "user", "content": "hello there"}]})
def chat_completions():
    req = parse(ChatCompletionRequest)
    messages = [m.as_job() for m in req.messages]
    call = Call(req.model, "chat", messages, req.params(), stream=req.stream, input_name="messages")
    return _generate(req, call, chat=True)


@bp.post("/images/generations")
@documented("openai", "Image generation (OpenAI-compatible, `b64_json`)",
            Ok(200, Images, "the image", headers=CALL_HEADERS), QUEUED, errors=CALL_ERRORS,
            idempotent=True, prefer_async=True, body=ImageRequest, pin=True,
            example={"model": "tiny-sd", "prompt": "a lighthouse at dusk", "size": "256x256"})
def images():
    req = parse(ImageRequest)
    call = Call(req.model, "image", req.prompt, req.params(), input_name="prompt",
                param_names={"width": "size", "height": "size"})
    call.wait()
    image = call.result().get("image") or {}
    return jsonify({"created": int(time.time()), "data": [{"b64_json": image.get("b64_png")}]}), 200, call.headers


@bp.errorhandler(RespondAsync)
def _respond_async(accepted: RespondAsync):
    return jsonify(accepted.record.public()), accepted.status, accepted.headers


@bp.errorhandler(ClientGone)
def _client_gone(_err: ClientGone):
    return Response(status=499)  # nobody reads it; the job is cancelled (a shared one when all left)


def _generate(req: Sampling, call: Call, *, chat: bool):
    call.wait(until_running=req.stream)
    if not req.stream:
        result = call.result()
        return jsonify(completion_body(call.record.id, call.record.model, result, chat)), 200, call.headers
    if call.record.terminal and call.record.status != "succeeded":
        raise job_error(call.record)
    include_usage = bool(getattr(req, "stream_options", None) and req.stream_options.include_usage)
    headers = {**call.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(_events(call, chat, include_usage)), mimetype="text/event-stream",
                    headers=headers)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _events(call: Call, chat: bool, include_usage: bool) -> Iterator[str]:
    record = call.record
    base = {"id": ("chatcmpl-" if chat else "cmpl-") + record.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": record.model}

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        if chat:
            delta = {} if text is None else {"content": text}
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

    if chat:
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
    try:
        for piece in call.pieces():
            yield _sse(chunk(piece, None))
    except ClientGone:
        return
    final = call.record
    if final.status != "succeeded":
        yield _sse(job_error(final).envelope())
        yield _sse("[DONE]")
        return
    result = final.result or {}
    yield _sse(chunk(None, result.get("finish_reason") or "stop"))
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage_of(result)})
    yield _sse("[DONE]")
