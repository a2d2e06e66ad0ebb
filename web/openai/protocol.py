"""Parsing of the OpenAI-compatible request bodies (the models live in
:mod:`tasks.openai_requests`, shared with the batch runner) and the Batch API's own bodies.

Every validation error is a 400 ``invalid_request_error``, which the official SDK raises as
``BadRequestError``.
"""
from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, Field

from tasks.errors import InvalidRequest, Unprocessable
from tasks.openai_requests import (ChatCompletionRequest, ChatMessage, CompletionRequest, ContentPart,
                                   EmbeddingsRequest, ImageRequest, Lenient, Sampling, StreamOptions)
from web.util import parse_body

M = TypeVar("M", bound=BaseModel)

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ContentPart", "EmbeddingsRequest",
           "ImageRequest", "Lenient", "Sampling", "StreamOptions", "BatchCreateRequest", "parse"]


def parse(model: type[M]) -> M:
    """:func:`web.util.parse_body`, with a body that does not fit answered 400 (OpenAI's way)."""
    try:
        return parse_body(model)
    except Unprocessable as exc:
        raise InvalidRequest(exc.message, param=exc.param) from None


class BatchCreateRequest(Lenient):
    """``POST /v1/batches``: run every request of an uploaded ``purpose="batch"`` file."""

    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: Literal["/v1/embeddings", "/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
