"""Request limits: how much one job may ask for, checked before it is queued.

A request over a limit is answered 400 ``limit_exceeded`` naming the field, on ``/v1/jobs``
and on the OpenAI-compatible routes alike; a batch line over one is answered so in the batch's
error file (workers/jobs/batch_chunk.py). The limits are settings (``MODELBAY_MAX_*``):
inputs per job, characters per job, ``max_tokens``, image side in pixels and denoising steps.
The body size limit (``MODELBAY_MAX_BODY_MB``) is enforced before parsing (413).
"""
from __future__ import annotations

from typing import Any

from tasks.errors import ErrorCode, InvalidRequest
from tasks.settings import Settings


def _over(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=ErrorCode.LIMIT_EXCEEDED)


def _texts(task: str, input_: Any) -> list[str]:
    if isinstance(input_, str):
        return [input_]
    if task == "chat":
        return [m.get("content", "") if isinstance(m, dict) else str(getattr(m, "content", "")) for m in input_]
    return [str(t) for t in input_]


def check_limits(task: str, input_: Any, params: dict[str, Any], settings: Settings, *,
                 input_name: str = "input", params_prefix: str = "params.") -> None:
    """Raise :class:`InvalidRequest` (400, ``limit_exceeded``) for the first limit the job
    (``task``, ``input_``, ``params``) goes over. ``input_name`` and ``params_prefix`` name
    the fields as the caller's API spells them."""
    texts = _texts(task, input_)
    if len(texts) > settings.max_inputs:
        what = "messages" if task == "chat" else "texts"
        raise _over(f"{len(texts)} {what} in one request; the limit is {settings.max_inputs} "
                    "(MODELBAY_MAX_INPUTS)", input_name)
    chars = sum(len(t) for t in texts)
    if chars > settings.max_input_chars:
        raise _over(f"the input has {chars} characters; the limit is {settings.max_input_chars} "
                    "(MODELBAY_MAX_INPUT_CHARS)", input_name)
    limits = {"max_tokens": (settings.max_tokens_limit, "MODELBAY_MAX_TOKENS_LIMIT"),
              "width": (settings.max_image_side_px, "MODELBAY_MAX_IMAGE_SIDE_PX"),
              "height": (settings.max_image_side_px, "MODELBAY_MAX_IMAGE_SIDE_PX"),
              "steps": (settings.max_image_steps, "MODELBAY_MAX_IMAGE_STEPS")}
    for key, (limit, env) in limits.items():
        value = params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
            raise _over(f"{key} is {value}; the limit is {limit} ({env})", params_prefix + key)
