"""Pydantic models of the OpenAI-compatible request bodies, and their mapping to modelbay jobs.

Shared by the synchronous routes (web/openai/, which parse a request body with them) and the
batch runner (workers/jobs/batch.py, which parses each batch line's ``body`` with them), so a
line of a batch is read exactly as the same body sent to the route.

Unknown fields are ignored (clients send ``user``, penalties, ...); fields that would change
the answer but are not supported (``n`` > 1, ``logprobs``, ``tools``, image URLs) are
refused with 400 rather than silently dropped.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Sampling(Lenient):
    """Sampling fields shared by completions and chat."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    logprobs: Any = None

    @model_validator(mode="after")
    def _supported(self) -> Sampling:
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return self

    def params(self) -> dict[str, Any]:
        """The job's ``params``: what the backends understand, without the unset fields."""
        fields = ("max_tokens", "temperature", "top_p", "seed", "stop")
        return {k: getattr(self, k) for k in fields if getattr(self, k) is not None}


class StreamOptions(Lenient):
    include_usage: bool = False


class EmbeddingsRequest(Lenient):
    model: str = Field(min_length=1, max_length=128)
    input: str | list[str] = Field(description="a text or a list of texts (token arrays are not supported)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        return value

    @model_validator(mode="after")
    def _no_dimensions(self) -> EmbeddingsRequest:
        if self.dimensions is not None:
            raise ValueError("dimensions is not supported: the model's own dimension is used")
        return self


class CompletionRequest(Sampling):
    model: str = Field(min_length=1, max_length=128)
    prompt: str | list[str]
    echo: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("prompt must be a string or a list of exactly one string")
        return value

    @model_validator(mode="after")
    def _no_echo(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_job(self) -> dict[str, str]:
        content = self.content
        text = "".join(p.text for p in content) if isinstance(content, list) else (content or "")
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(Sampling):
    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class ImageRequest(Lenient):
    model: str = Field(min_length=1, max_length=128)
    prompt: str = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    size: str | None = Field(default=None, description="WIDTHxHEIGHT in pixels, e.g. 512x512")
    response_format: Literal["b64_json"] = "b64_json"
    negative_prompt: str | None = None
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = None
    seed: int | None = Field(default=None, ge=0)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not _SIZE.fullmatch(value):
            raise ValueError("size must be WIDTHxHEIGHT, e.g. 512x512")
        return value

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in ("negative_prompt", "steps", "guidance", "seed")
                               if getattr(self, k) is not None}
        if self.size:
            width, height = _SIZE.fullmatch(self.size).groups()  # type: ignore[union-attr]
            out.update(width=int(width), height=int(height))
        return out
