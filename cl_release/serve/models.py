"""Request and response models of the gateway (pydantic); ``/openapi.json`` is generated from them.

The collector's models (``LogRequest``, ``FeedbackRequest``) take their bounds from the feedback
store's own rules (``cl_release.store.sqlite``), which still check every value; the OpenAI models
follow the shapes of the OpenAI chat completions API, with the fields this gateway reads. An
OpenAI request may carry other fields: they go to an ``openai`` upstream unchanged, and the
``local`` backend refuses those it cannot honour.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..store.sqlite import MAX_TOKENS, SEVERITIES

# ---------------------------------------------------------------- collector


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str


class LogRequest(BaseModel):
    """One model answer to store. Idempotent on ``request_id``: logging the same id with the same
    input and output again keeps the first; with another input or output it is a 409."""

    model_config = ConfigDict(extra="forbid")

    input: Union[str, list[Message]] = Field(description="the prompt, or the chat messages")
    output: str
    request_id: str | None = Field(None, min_length=1, description="default: a new uuid4 hex")
    model_version: str | None = Field(None, description="a version in the registry (422 otherwise)")
    route_key: str | None = Field(
        None, min_length=1,
        description="record the version the router serves this key (when model_version is absent)")
    latency_ms: float | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    quality_score: float | None = Field(None, ge=0, le=1)
    metadata: dict[str, Any] | None = None
    created_at: Union[str, float, None] = Field(None, description="ISO-8601 or epoch seconds; default now")


class LogResponse(BaseModel):
    request_id: str
    model_version: str | None


class FeedbackRequest(BaseModel):
    """Feedback on a logged answer: at least one of rating, thumbs, correction, notes,
    hallucinated, error_tag, severity. Any number per answer; the latest counts."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1)
    rating: int | None = Field(None, ge=1, le=5)
    thumbs: Union[bool, Literal[-1, 0, 1, "up", "down"], None] = None
    correction: str | None = None
    notes: str | None = None
    hallucinated: bool | None = None
    error_tag: str | None = None
    severity: Literal[SEVERITIES] | None = None  # type: ignore[valid-type]
    annotator: str | None = None
    created_at: Union[str, float, None] = None


class FeedbackResponse(BaseModel):
    id: int
    request_id: str


class RouteResponse(BaseModel):
    key: str
    version: str
    arm: Literal["champion", "challenger"]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]


class ErrorDetail(BaseModel):
    status: int
    message: str


class Error(BaseModel):
    """The collector endpoints' error body."""

    error: ErrorDetail


# ---------------------------------------------------------------- OpenAI-compatible


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """An OpenAI chat completion request. ``model``: ``champion``, ``challenger``, a served
    version (``1.2.0`` or ``v1.2.0``), or the project name (the A/B router picks, sticky on
    ``user`` or the ``X-CL-Release-Key`` header)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = Field(None, description="the sticky routing key (also: the X-CL-Release-Key header)")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """The answer; ``id`` is the request id to send ``POST /feedback`` with (also in the
    ``X-Request-Id`` header); the ``X-CL-Release-Version`` header names the version that answered."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer (``data: {...}``; the stream ends with
    ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    version: str = Field(description="the release version this name serves now")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """The /v1 endpoints' error body (the OpenAI shape)."""

    error: OpenAIErrorDetail
