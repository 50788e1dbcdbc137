"""Validation of client bodies: what we need to route, checked; the rest passes through.

Providers accept parameters we do not know (vLLM, Ollama and others add their own), so
unknown fields are forwarded untouched; the fields we read or that would break a provider
are checked here and a mistake is a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from router.config import field_path
from router.errors import BadRequest

MAX_OUTPUT_TOKENS = 1_000_000
MAX_MESSAGES = 20_000
"""Messages in one chat body. Validating a message costs about 4 us and 450 bytes: 260,000
tiny messages (7 MiB) took 1.1 s of the event loop and 117 MiB, refused now at once (pydantic
checks a list's length before its items). 20,000 is beyond any context window in use."""
MAX_CONTENT_PARTS = 10_000
"""Content parts of one message."""
MAX_EMBEDDING_INPUTS = 2048
"""Inputs of one embeddings body (OpenAI's own limit). An over-long list of token ids cost
pydantic 536 MiB (an error object per element and per union arm); now refused at once."""
MAX_EMBEDDING_TOKENS = 65_536
"""Token ids in one embeddings input given as tokens."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)] | None = (
        None
    )


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ChatBody(_Body):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_OUTPUT_TOKENS)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_OUTPUT_TOKENS)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None


class EmbeddingsBody(_Body):
    model: Annotated[str, Field(min_length=1)]
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | Annotated[list[StrictInt], Field(min_length=1, max_length=MAX_EMBEDDING_TOKENS)]
        | Annotated[
            list[Annotated[list[StrictInt], Field(max_length=MAX_EMBEDDING_TOKENS)]],
            Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS),
        ]
    )


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


B = TypeVar("B", bound=_Body)
_ARMS = frozenset({"str", "int", "float", "bool", "none", "StreamOptions"})


def _is_arm(part: str) -> bool:
    return part in _ARMS or "[" in part or part.startswith("constrained-")


def check(model: type[B], data: dict[str, Any]) -> B:
    """Validate ``data`` as ``model`` (``ChatBody``, ``EmbeddingsBody``), or a 400."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        # pydantic names the union arm that failed ("str", "list[str]"): not a field
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or not _is_arm(p))
        param = field_path(loc[:4])
        msg = "has the wrong type" if len(loc) < len(err["loc"]) else err["msg"]
        raise BadRequest(f"invalid value for '{param}': {msg}", param=param) from None
