"""Pydantic models of the HTTP response bodies, for the OpenAPI document (:mod:`web.openapi`).

The routes build their answers as dicts; these models state those shapes (the request models
are :mod:`tasks.schemas` and :mod:`web.openai.protocol`). A response that does not fit its
model is a bug of the route or of the model: ``tests/test_openapi.py`` fuzzes the live server
against the document built from them. Models allow unknown fields (a new field is not a
breaking change), except where a value is a constant of the protocol.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.events import OperationRow
from tasks.schemas import ErrorBody, JobRecord, Manifest, ModelNode, NodeRecord

ModelStatus = Literal["registered", "ready", "loading", "staging", "unloading", "failed"]


# ---- errors ---------------------------------------------------------------------------------

class ErrorResponse(BaseModel):
    """The one error envelope of every route (OpenAI's shape); ``error`` may carry more fields."""

    error: ErrorBody


class LoadingInfo(BaseModel):
    """The load an OpenAI-compatible call gave up waiting for (503 ``model_loading``)."""

    model: str
    job: str | None = None
    phase: str
    progress: float | None = Field(default=None, description="percent; null while loading (no measure)")
    bytes_done: int | None = None
    bytes_total: int | None = None
    file_index: int | None = None
    files_total: int | None = None
    eta_s: float | None = None


class UnavailableResponse(ErrorResponse):
    """503: the error envelope, with ``loading`` next to it when a model is still loading."""

    loading: LoadingInfo | None = None


# ---- modelbay's own routes ------------------------------------------------------------------

class ModelObject(BaseModel):
    """A catalog entry with its overall status and its state on each node."""

    id: str
    object: Literal["model"]
    created: int = Field(description="unix seconds of the first registration")
    owned_by: str
    backend: str
    status: ModelStatus = Field(description="the most useful state on any node, else registered")
    nodes: list[ModelNode]


class ModelDetail(ModelObject):
    """One model, with its manifest."""

    manifest: Manifest


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"]
    deleted: Literal[True]
    unload_jobs: list[JobRecord] = Field(description="one unload job per node that held the model")


class JobList(BaseModel):
    object: Literal["list"]
    data: list[JobRecord]


class NodeEntry(NodeRecord):
    """A live worker node and the models it holds."""

    models: list[ModelNode]


class NodeList(BaseModel):
    object: Literal["list"]
    data: list[NodeEntry]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    nodes: int = Field(ge=1, description="live worker nodes")


class Operations(BaseModel):
    operations: list[OperationRow]


# ---- OpenAI-compatible routes ---------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 "
                                                     "with encoding_format=base64")


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    """``POST /v1/chat/completions`` without ``stream``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str


class Completion(BaseModel):
    """``POST /v1/completions`` without ``stream``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ImageData(BaseModel):
    b64_json: str = Field(description="the PNG, base64")


class Images(BaseModel):
    created: int
    data: list[ImageData]


class OpenAPIDocument(BaseModel):
    """This document."""

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
