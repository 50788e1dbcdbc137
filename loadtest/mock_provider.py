"""Mock LLM provider: a real aiohttp server speaking the OpenAI or Anthropic HTTP API.

``--api openai`` serves chat completions, embeddings and the Responses API (with a bounded
store of responses for GET, DELETE and previous_response_id); ``--api anthropic`` serves
Messages. Answers are deterministic (tokens ``tok0 tok1 ...``, or one tool call by the rule in
``mock_tools``); latency, limits and faults are what the router is tested against. The
request side shared by every API lives in ``mock_calls``, the Responses shapes in
``mock_responses``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import math
import random
import signal
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from loadtest.mock_calls import (
    EMBED_DIM,
    MODEL_ID,
    ApiError,
    Call,
    Completion,
    Frame,
    ToolCall,
    bad_request,
    estimate_tokens,
    last_text,
    messages_tokens,
    plan_completion,
    positive_int,
    requested_model,
    sse_event,
)
from loadtest.mock_responses import ResponseStore, parse_responses, response_body, response_frames
from loadtest.mock_tools import chat_tool, messages_tool

WINDOW_S = 60.0
HANG_LIMIT_S = 600.0
HANG_POLL_S = 0.02
ARRIVALS = 10_000
"""How many arrivals GET /stats keeps (the latest)."""
APIS = ("openai", "anthropic")
ACCOUNTING = ("reserved", "actual")
FAULT_MODES = ("none", "error", "hang", "close", "bad_json", "cut_stream", "rate_limit")
FAULT_SCOPES = ("all", "api")
# Early faults answer before admission so they never enter the windows; late ones are admitted
# first because a real provider that hangs or cuts a stream has already accepted the request.
EARLY_FAULTS = frozenset({"error", "close", "bad_json", "rate_limit"})
LATE_FAULTS = frozenset({"hang", "cut_stream"})
OPENAI_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}
NOTED_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta")
"""Headers /stats repeats from the last API request, to check what a gateway forwards."""
KEY_HEADERS = ("x-api-key", "authorization")
BAD_JSON_BODY = b'<html><body>502 upstream glitch</body></html>{"choices": ['


def _check_choice(option: str, value: str, allowed: Iterable[str]) -> None:
    """Raise ValueError when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{option} must be one of {sorted(allowed)}, got {value!r}")


@dataclass
class MockConfig:
    """Settings of one mock provider; every CLI option maps onto one field."""

    name: str = "mock"
    api: str = "openai"
    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    ttft_ms: float | None = None
    chunk_interval_ms: float = 0.0
    completion_tokens: int = 16
    prompt_token_scale: float = 1.0
    """Reported prompt tokens = the estimate times this (a tokenizer that counts more than
    the router's estimate: CJK text, code), to measure what an under-estimate costs."""
    error_rate: float = 0.0
    error_status: int = 500
    rpm: int | None = None
    tpm: int | None = None
    tpm_accounting: str = "reserved"
    api_key: str | None = None
    fault: str = "none"
    seed: int | None = None
    tls_cert: str | None = None
    """Serve HTTPS with this certificate (PEM; its key in ``tls_key``)."""
    tls_key: str | None = None
    tls_client_ca: str | None = None
    """Require a client certificate signed by this CA (PEM): mutual TLS."""

    def __post_init__(self) -> None:
        """Normalise 'unlimited' and reject settings the server could not honour."""
        _check_choice("api", self.api, APIS)
        _check_choice("tpm_accounting", self.tpm_accounting, ACCOUNTING)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert")
        _check_choice("fault", self.fault, FAULT_MODES)
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be within 0..1, got {self.error_rate}")
        self.rpm = self.rpm or None
        self.tpm = self.tpm or None


class SlidingWindow:
    """Exact sliding log of (monotonic time, amount) entries over the last ``span`` seconds."""

    def __init__(self, limit: int | None, span: float = WINDOW_S) -> None:
        self.limit = limit
        self.span = span
        self.log: deque[tuple[float, int]] = deque()
        self.total = 0
        self.peak = 0

    def prune(self, now: float) -> None:
        """Drop entries that are 60 s old or older."""
        while self.log and self.log[0][0] <= now - self.span:
            self.total -= self.log.popleft()[1]

    def current(self, now: float) -> int:
        """Sum of the amounts inside the window at ``now``."""
        self.prune(now)
        return self.total

    def remaining(self, now: float) -> int | None:
        """Room left under the limit (None when unlimited)."""
        if self.limit is None:
            return None
        return max(0, self.limit - self.current(now))

    def add(self, amount: int, now: float) -> None:
        """Record ``amount`` at ``now`` and update the peak."""
        if amount <= 0:
            return
        self.prune(now)
        self.log.append((now, amount))
        self.total += amount
        self.peak = max(self.peak, self.total)

    def wait_for(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` more fits under the limit (0 when it fits now)."""
        if self.limit is None:
            return 0.0
        excess = self.current(now) + amount - self.limit
        if excess <= 0:
            return 0.0
        for stamp, entry in self.log:
            excess -= entry
            if excess <= 0:
                return stamp + self.span - now
        # Larger than the whole limit: it never fits, so advise a full window.
        return self.span

    def clear(self) -> None:
        """Forget every entry and the peak."""
        self.log.clear()
        self.total = 0
        self.peak = 0


@dataclass
class Fault:
    """Failure currently injected into the provider's answers."""

    mode: str = "none"
    status: int = 503
    retry_after_s: float = 2.0
    count: int | None = None
    after_chunks: int = 3
    scope: str = "all"
    """``all``: an outage of the whole server, ``GET /v1/models`` included (a probe sees it);
    ``api``: the API requests only, while the model list keeps answering 200 (a common
    provider incident, which a probe of the model list does not see)."""

    def consume(self) -> None:
        """Account one faulted request; disarm when ``count`` is used up."""
        if self.count is None:
            return
        self.count -= 1
        if self.count <= 0:
            self.mode, self.count = "none", None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        """Build a fault from a POST /admin/fault body (ValueError/TypeError when invalid)."""
        mode = str(data.get("mode", "none"))
        _check_choice("mode", mode, FAULT_MODES)
        scope = str(data.get("scope", "all"))
        _check_choice("scope", scope, FAULT_SCOPES)
        count = data.get("count")
        fault = cls(
            mode=mode,
            status=int(data.get("status", 503)),
            retry_after_s=float(data.get("retry_after_s", 2.0)),
            count=None if count is None else int(count),
            after_chunks=int(data.get("after_chunks", 3)),
            scope=scope,
        )
        if fault.count is not None and fault.count <= 0:
            fault.mode, fault.count = "none", None
        return fault


@dataclass
class Stats:
    """Counters served by GET /stats."""

    received: int = 0
    ok: int = 0
    rate_limited: int = 0
    faults: int = 0
    errors: int = 0
    disconnects: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    in_flight_peak: int = 0
    tokens_charged: int = 0
    models: dict[str, int] = field(default_factory=dict)
    last_traceparent: str | None = None
    last_max_tokens: int | None = None
    """The completion budget the last request named, to check what gateways send."""
    previous_not_found: int = 0
    """Responses API requests naming a previous_response_id this mock does not hold."""
    last_headers: dict[str, str] = field(default_factory=dict)
    """The NOTED_HEADERS of the last API request (never a key header)."""
    last_key_header: str | None = None
    """Which header carried the last API request's key (its name only, never the key)."""
    paths: dict[str, int] = field(default_factory=dict)
    """Requests served per route (``/v1/responses/{response_id}`` for any id)."""
    arrivals: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=ARRIVALS))
    """(CLOCK_MONOTONIC, the first 40 characters of the last message's text) of the latest
    ARRIVALS valid requests: when each reached the provider, comparable with other processes'
    ``time.monotonic()`` on the same host, to check the order a gateway admitted them in."""

    def record(self, counter: str | None, status: int | None) -> None:
        """Bump an outcome counter and/or the per-status count."""
        if counter is not None:
            setattr(self, counter, getattr(self, counter) + 1)
        if status is not None:
            key = str(status)
            self.by_status[key] = self.by_status.get(key, 0) + 1

    def enter(self) -> None:
        """A request started."""
        self.in_flight += 1
        self.in_flight_peak = max(self.in_flight_peak, self.in_flight)

    def leave(self) -> None:
        """A request finished."""
        self.in_flight -= 1


def embedding_items(raw: Any) -> list[Any]:
    """The embedding inputs as a list: one item per vector to return."""
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        return [raw]
    if isinstance(raw, list) and raw:
        return raw
    raise bad_request("'input' must be a non-empty string or array", param="input")


def embedding_tokens(items: list[Any]) -> int:
    """Estimated tokens of embedding inputs; pre-tokenized arrays count one per id."""
    chars = sum(len(item) for item in items if isinstance(item, str))
    ids = sum(len(item) for item in items if isinstance(item, list))
    return estimate_tokens(chars) + ids


def stop_words(raw: Any) -> frozenset[str]:
    """Stop sequences of a request, as stripped strings."""
    if isinstance(raw, str):
        return frozenset({raw.strip()})
    if isinstance(raw, list):
        return frozenset(s.strip() for s in raw if isinstance(s, str))
    return frozenset()


def require_messages(body: dict[str, Any]) -> list[Any]:
    """The request's non-empty ``messages`` array."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", param="messages")
    return messages


def parse_chat(body: dict[str, Any]) -> Call:
    """Validate an OpenAI chat.completions request."""
    options = body.get("stream_options")
    messages = require_messages(body)
    return Call(
        kind="chat",
        model=requested_model(body),
        prompt_tokens=messages_tokens(messages, tools=body.get("tools")),
        stream=body.get("stream") is True,
        max_tokens=positive_int(body, ("max_completion_tokens", "max_tokens")),
        stops=stop_words(body.get("stop")),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        tool=chat_tool(body, messages),
    )


def parse_messages(body: dict[str, Any]) -> Call:
    """Validate an Anthropic Messages request (``system`` a string or a list of blocks)."""
    messages = require_messages(body)
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise bad_request("system: Input should be a valid string or list", param="system")
    return Call(
        kind="messages",
        model=requested_model(body),
        prompt_tokens=messages_tokens(messages, system, body.get("tools")),
        stream=body.get("stream") is True,
        max_tokens=positive_int(body, ("max_tokens",), required=True),
        stops=stop_words(body.get("stop_sequences")),
        tool=messages_tool(body, messages),
    )


def parse_embeddings(body: dict[str, Any]) -> Call:
    """Validate an OpenAI embeddings request."""
    items = embedding_items(body.get("input"))
    return Call(
        kind="embeddings",
        model=requested_model(body),
        prompt_tokens=embedding_tokens(items),
        inputs=items,
        dimensions=positive_int(body, ("dimensions",)) or EMBED_DIM,
        base64=body.get("encoding_format") == "base64",
    )


PARSERS: dict[str, Callable[[dict[str, Any]], Call]] = {
    "chat": parse_chat,
    "messages": parse_messages,
    "embeddings": parse_embeddings,
    "responses": parse_responses,
}


def openai_usage(call: Call, completion_tokens: int) -> dict[str, int]:
    """OpenAI ``usage`` object."""
    return {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": call.prompt_tokens + completion_tokens,
    }


def chat_tool_call(tool: ToolCall, arguments: str) -> dict[str, Any]:
    """A chat ``tool_calls`` entry (a stream's first one carries empty arguments)."""
    return {
        "id": f"call_{tool.hex}",
        "type": "function",
        "function": {"name": tool.name, "arguments": arguments},
    }


def chat_message(comp: Completion) -> dict[str, Any]:
    """The assistant message of a ``chat.completion``: text, or one tool call and no content."""
    if comp.tool is None:
        return {"role": "assistant", "content": comp.text, "refusal": None}
    calls = [chat_tool_call(comp.tool, comp.tool.arguments)]
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}


def chat_completion_body(call: Call, comp: Completion) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object."""
    message = chat_message(comp)
    return {
        "id": f"chatcmpl-{call.rid}",
        "object": "chat.completion",
        "created": call.created,
        "model": call.model,
        "system_fingerprint": "fp_mock",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": OPENAI_FINISH[comp.reason],
            }
        ],
        "usage": openai_usage(call, comp.output_tokens),
    }


def tool_use_block(tool: ToolCall, complete: bool) -> dict[str, Any]:
    """An Anthropic ``tool_use`` block (a stream opens it with an empty input)."""
    return {
        "type": "tool_use",
        "id": f"toolu_{tool.hex}",
        "name": tool.name,
        "input": tool.input() if complete else {},
    }


def anthropic_content(comp: Completion) -> list[dict[str, Any]]:
    """The content of an Anthropic answer: one text block, or one tool_use block."""
    if comp.tool is not None:
        return [tool_use_block(comp.tool, complete=True)]
    return [{"type": "text", "text": comp.text}]


def anthropic_message(call: Call, comp: Completion | None) -> dict[str, Any]:
    """An Anthropic ``message`` object; ``comp=None`` gives the empty one message_start carries."""
    return {
        "id": f"msg_{call.rid}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": [] if comp is None else anthropic_content(comp),
        "stop_reason": None if comp is None else comp.reason,
        "stop_sequence": None if comp is None else comp.stop_sequence,
        "usage": {
            "input_tokens": call.prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1 if comp is None else comp.output_tokens,
        },
    }


def embedding_vector(item: Any, dims: int) -> list[float]:
    """A deterministic pseudo-embedding of ``item`` in [-1, 1]."""
    seed = hashlib.sha256(repr(item).encode()).digest()
    while len(seed) < dims:
        seed += hashlib.sha256(seed).digest()
    return [round(b / 127.5 - 1.0, 6) for b in seed[:dims]]


def embeddings_body(call: Call) -> dict[str, Any]:
    """An embeddings ``list`` response (base64-packed float32 when the client asked for it)."""
    data: list[dict[str, Any]] = []
    for index, item in enumerate(call.inputs):
        vector = embedding_vector(item, call.dimensions)
        packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append(
            {"object": "embedding", "index": index, "embedding": packed if call.base64 else vector}
        )
    usage = {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens}
    return {"object": "list", "data": data, "model": call.model, "usage": usage}


def answer_body(call: Call, comp: Completion) -> dict[str, Any]:
    """The non-streamed JSON body for ``call``."""
    if call.kind == "chat":
        return chat_completion_body(call, comp)
    if call.kind == "messages":
        return anthropic_message(call, comp)
    return embeddings_body(call)


def sse_data(payload: dict[str, Any]) -> bytes:
    """An OpenAI-style ``data:`` SSE frame."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def openai_frames(call: Call, comp: Completion) -> Iterator[Frame]:
    """The chat.completion.chunk frames of a stream, with the tokens each carries."""
    base = {
        "id": f"chatcmpl-{call.rid}",
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": call.model,
        "system_fingerprint": "fp_mock",
    }
    # OpenAI sends an explicit null usage on every chunk once include_usage is requested.
    tail = {"usage": None} if call.include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse_data({**base, "choices": [choice], **tail})

    if comp.tool is None:
        yield chunk({"role": "assistant", "content": ""}), 0
        for token in comp.tokens:
            yield chunk({"content": token}), 1
    else:
        opening = {"index": 0, **chat_tool_call(comp.tool, "")}
        yield chunk({"role": "assistant", "content": None, "tool_calls": [opening]}), 0
        for piece, tokens in comp.tool.paced_pieces():
            more = {"index": 0, "function": {"arguments": piece}}
            yield chunk({"tool_calls": [more]}), tokens
    yield chunk({}, OPENAI_FINISH[comp.reason]), 0
    if call.include_usage:
        usage = openai_usage(call, comp.output_tokens)
        yield sse_data({**base, "choices": [], "usage": usage}), 0
    yield b"data: [DONE]\n\n", 0


def anthropic_deltas(comp: Completion) -> list[tuple[dict[str, Any], int]]:
    """The content block's deltas: text tokens, or the tool input's JSON in pieces."""
    if comp.tool is None:
        return [({"type": "text_delta", "text": token}, 1) for token in comp.tokens]
    return [
        ({"type": "input_json_delta", "partial_json": piece}, tokens)
        for piece, tokens in comp.tool.paced_pieces()
    ]


def anthropic_frames(call: Call, comp: Completion) -> Iterator[Frame]:
    """The Messages API event frames of a stream, with the tokens each carries."""
    start = {"type": "message_start", "message": anthropic_message(call, None)}
    yield sse_event("message_start", start), 0
    block = {"type": "text", "text": ""} if comp.tool is None else tool_use_block(comp.tool, False)
    yield (
        sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
        0,
    )
    yield sse_event("ping", {"type": "ping"}), 0
    for delta, tokens in anthropic_deltas(comp):
        event = {"type": "content_block_delta", "index": 0, "delta": delta}
        yield sse_event("content_block_delta", event), tokens
    yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}), 0
    stop = {"stop_reason": comp.reason, "stop_sequence": comp.stop_sequence}
    usage = {"output_tokens": comp.output_tokens}
    yield sse_event("message_delta", {"type": "message_delta", "delta": stop, "usage": usage}), 0
    yield sse_event("message_stop", {"type": "message_stop"}), 0


def stream_frames(call: Call, comp: Completion, final: dict[str, Any] | None) -> Iterator[Frame]:
    """The SSE frames of a streamed answer in its API's shape (``final``: a Responses answer)."""
    if final is not None:
        return response_frames(call, comp, final)
    return openai_frames(call, comp) if call.kind == "chat" else anthropic_frames(call, comp)


def model_list(cfg: MockConfig) -> dict[str, Any]:
    """The GET /v1/models body in the configured API's shape."""
    if cfg.api == "anthropic":
        entry: dict[str, Any] = {
            "id": MODEL_ID,
            "type": "model",
            "display_name": f"Mock model ({cfg.name})",
            "created_at": "2024-01-01T00:00:00Z",
        }
        return {"data": [entry], "has_more": False, "first_id": MODEL_ID, "last_id": MODEL_ID}
    entry = {"id": MODEL_ID, "object": "model", "created": 1704067200, "owned_by": cfg.name}
    return {"object": "list", "data": [entry]}


def format_reset(seconds: float) -> str:
    """A reset duration the way OpenAI's x-ratelimit-reset-* headers write it (e.g. '1.5s')."""
    return f"{max(seconds, 0.0):.3f}".rstrip("0").rstrip(".") + "s"


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if value is None or not value.startswith("Bearer "):
        return None
    return value[len("Bearer ") :]


def client_connected(request: web.BaseRequest) -> bool:
    """True while the client's TCP connection is still open."""
    transport = request.transport
    return transport is not None and not transport.is_closing()


def drop_connection(
    request: web.BaseRequest, resp: web.StreamResponse | None = None
) -> web.StreamResponse:
    """Close the TCP connection so the client sees a disconnect instead of an (end of) answer."""
    if request.transport is not None:
        request.transport.close()
    # aiohttp then fails to write this response, treats it as a client disconnect and stays quiet.
    return resp if resp is not None else web.Response()


class MockProvider:
    """State and request handlers of one mock provider."""

    def __init__(self, cfg: MockConfig) -> None:
        self.cfg = cfg
        self.clock: Callable[[], float] = time.monotonic
        self.rng = random.Random(cfg.seed)
        self.rpm = SlidingWindow(cfg.rpm)
        self.tpm = SlidingWindow(cfg.tpm)
        self.fault = Fault(mode=cfg.fault)
        self.stats = Stats()
        self.responses = ResponseStore()

    def routes(self) -> list[web.RouteDef]:
        """The URL map for the configured API."""
        if self.cfg.api == "openai":
            api = [
                web.post("/v1/chat/completions", self._chat),
                web.post("/v1/embeddings", self._embeddings),
                web.post("/v1/responses", self._responses),
                web.get("/v1/responses/{response_id}", self._get_response),
                web.delete("/v1/responses/{response_id}", self._delete_response),
            ]
        else:
            api = [web.post("/v1/messages", self._messages)]
        return [
            *api,
            web.get("/v1/models", self._models),
            web.get("/stats", self._get_stats),
            web.post("/stats/reset", self._reset_stats),
            web.get("/admin/fault", self._get_fault),
            web.post("/admin/fault", self._set_fault),
        ]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._api(request, "chat")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/messages."""
        return await self._api(request, "messages")

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/embeddings."""
        return await self._api(request, "embeddings")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/responses."""
        return await self._api(request, "responses")

    async def _get_response(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/responses/{response_id}: a stored response, or 404."""
        return await self._stored(request, delete=False)

    async def _delete_response(self, request: web.Request) -> web.StreamResponse:
        """DELETE /v1/responses/{response_id}: forget a stored response, or 404."""
        return await self._stored(request, delete=True)

    async def _stored(self, request: web.Request, delete: bool) -> web.StreamResponse:
        """Look a stored response up (and maybe delete it), behind the outage and key checks."""
        self._note(request, api=True)
        outage = await self._outage(request)
        if outage is not None:
            return outage
        rid = request.match_info["response_id"]
        try:
            self._check_headers(request)
            stored = self.responses.get(rid)
            if stored is None:
                raise ApiError(404, f"No response found with id '{rid}'.")
        except ApiError as err:
            return self._json(err.body(self.cfg.api), status=err.status)
        if not delete:
            return self._json(stored.body)
        self.responses.delete(rid)
        return self._json({"id": rid, "object": "response.deleted", "deleted": True})

    def _note(self, request: web.Request, api: bool) -> None:
        """Count the request's route; for API requests keep the NOTED_HEADERS."""
        route = request.match_info.route.resource
        path = route.canonical if route is not None else request.path
        self.stats.paths[path] = self.stats.paths.get(path, 0) + 1
        if api:
            headers = request.headers
            self.stats.last_headers = {
                name: headers[name] for name in NOTED_HEADERS if name in headers
            }
            self.stats.last_key_header = next((h for h in KEY_HEADERS if h in headers), None)

    async def _api(self, request: web.Request, kind: str) -> web.StreamResponse:
        """Serve one API POST with in-flight bookkeeping and API-shaped error answers."""
        self._note(request, api=True)
        self.stats.received += 1
        self.stats.enter()
        try:
            return await self._serve(request, kind)
        except ApiError as err:
            self.stats.record(err.counter, err.status)
            return self._json(err.body(self.cfg.api), status=err.status, headers=err.headers)
        except ConnectionError:
            # The client left before the answer started; aiohttp stays quiet about the dead
            # response, whereas letting this escape would be logged as a server error.
            self.stats.record("disconnects", None)
            return web.Response()
        finally:
            self.stats.leave()

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        """Faults, validation, errors, admission, then the answer - in a real provider's order."""
        raw = await request.read()
        self.stats.last_traceparent = request.headers.get("traceparent")
        early = self._take_fault(EARLY_FAULTS)
        if early is not None:
            return self._early_fault(request, early)
        self._check_headers(request)
        body = self._decode(raw)
        call = PARSERS[kind](body)
        if call.kind == "responses":
            self._continue(call)
        self.stats.arrivals.append((time.monotonic(), last_text(body)))
        if self.cfg.prompt_token_scale != 1.0:
            call.prompt_tokens = math.ceil(call.prompt_tokens * self.cfg.prompt_token_scale)
        self.stats.models[call.model] = self.stats.models.get(call.model, 0) + 1
        self.stats.last_max_tokens = call.max_tokens
        if self.cfg.error_rate and self.rng.random() < self.cfg.error_rate:
            raise ApiError(
                self.cfg.error_status, "The server had an error (injected by error rate)"
            )
        self._admit(call)
        late = self._take_fault(LATE_FAULTS)
        if late is not None and late.mode == "hang":
            return await self._hang(request)
        cut = late.after_chunks if late is not None else None
        return await self._answer(request, call, cut)

    def _continue(self, call: Call) -> None:
        """Resolve previous_response_id: its context joins the input, or the request is a 400."""
        previous = call.echo["previous_response_id"]
        if previous is None:
            return
        stored = self.responses.get(previous)
        if stored is None:
            raise ApiError(
                400,
                f"Previous response with id '{previous}' not found.",
                counter="previous_not_found",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        call.prompt_tokens += stored.context_tokens

    def _take_fault(self, modes: frozenset[str]) -> Fault | None:
        """A copy of the armed fault if its mode is in ``modes``, consuming one use of it."""
        if self.fault.mode not in modes:
            return None
        taken = replace(self.fault)
        self.fault.consume()
        return taken

    def _early_fault(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        """Answer with a fault that happens before the request is admitted."""
        if fault.mode == "close":
            self.stats.record("faults", None)
            return drop_connection(request)
        if fault.mode == "bad_json":
            self.stats.record("faults", 200)
            return web.Response(body=BAD_JSON_BODY, content_type="application/json")
        if fault.mode == "rate_limit":
            headers = {
                "Retry-After": str(math.ceil(fault.retry_after_s)),
                "retry-after-ms": str(round(fault.retry_after_s * 1000)),
            }
            raise ApiError(
                429,
                "Rate limit reached (injected fault)",
                counter="faults",
                openai_type="requests",
                code="rate_limit_exceeded",
                headers=headers,
            )
        raise ApiError(fault.status, f"Injected fault: HTTP {fault.status}", counter="faults")

    def _check_headers(self, request: web.Request) -> None:
        """Enforce the API key and, for Anthropic, the anthropic-version header."""
        if self.cfg.api == "anthropic":
            # x-api-key, or a bearer token: Claude Code's auth-token mode and the anthropic
            # SDK from 2.x send the key as "Authorization: Bearer"
            key = request.headers.get("x-api-key") or bearer(request.headers.get("Authorization"))
            if self.cfg.api_key and key != self.cfg.api_key:
                raise ApiError(401, "invalid x-api-key")
            if not request.headers.get("anthropic-version"):
                raise bad_request("anthropic-version: header is required")
        elif self.cfg.api_key and request.headers.get("Authorization") != (
            f"Bearer {self.cfg.api_key}"
        ):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    @staticmethod
    def _decode(raw: bytes) -> dict[str, Any]:
        """The request body as a JSON object."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(
                400,
                "We could not parse the JSON body of your request. The body must be a JSON object.",
                code="invalid_json",
            )
        return body

    def _arrival_charge(self, call: Call) -> int:
        """Tokens charged to the TPM window when the request arrives."""
        if self.cfg.tpm_accounting == "actual" or call.kind == "embeddings":
            return call.prompt_tokens
        # OpenAI's documented rule: the request counts as the larger of max_tokens and the prompt.
        return max(call.max_tokens or 0, call.prompt_tokens)

    def _charge(self, tokens: int, now: float) -> None:
        """Add ``tokens`` to the TPM window and the running total."""
        self.tpm.add(tokens, now)
        self.stats.tokens_charged += max(tokens, 0)

    def _admit(self, call: Call) -> None:
        """Count the request in both windows, or raise a 429 if it would exceed a limit."""
        now = self.clock()
        charge = self._arrival_charge(call)
        if self.rpm.wait_for(1, now) > 0 or self.tpm.wait_for(charge, now) > 0:
            raise self._limit_error(call, charge, now)
        self.rpm.add(1, now)
        self._charge(charge, now)

    def _settle(self, call: Call, completion_tokens: int) -> None:
        """In actual accounting, charge the completion tokens once the answer is over."""
        if self.cfg.tpm_accounting == "actual" and call.kind != "embeddings":
            self._charge(completion_tokens, self.clock())

    def _limit_error(self, call: Call, charge: int, now: float) -> ApiError:
        """The 429 for a request the provider's own RPM/TPM limits reject."""
        rpm_wait = self.rpm.wait_for(1, now)
        wait = max(rpm_wait, self.tpm.wait_for(charge, now))
        what, window, asked = (
            ("requests", self.rpm, 1) if rpm_wait else ("tokens", self.tpm, charge)
        )
        message = (
            f"Rate limit reached for {call.model} on {what} per min: Limit {window.limit}, "
            f"Used {window.current(now)}, Requested {asked}. Please try again in {wait:.3f}s."
        )
        api_headers = (
            self._anthropic_ratelimit_headers(charge, now) if self.cfg.api == "anthropic" else {}
        )
        headers = {
            **self._ratelimit_headers(charge, now),
            **api_headers,
            "Retry-After": str(max(1, math.ceil(wait))),
            "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
        }
        return ApiError(
            429,
            message,
            counter="rate_limited",
            openai_type=what,
            code="rate_limit_exceeded",
            headers=headers,
        )

    def _ratelimit_headers(self, charge: int, now: float) -> dict[str, str]:
        """OpenAI-style x-ratelimit-* headers for the limits that are set."""
        headers: dict[str, str] = {}
        for unit, window, amount in (("requests", self.rpm, 1), ("tokens", self.tpm, charge)):
            if window.limit is None:
                continue
            headers[f"x-ratelimit-limit-{unit}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{unit}"] = str(window.remaining(now))
            headers[f"x-ratelimit-reset-{unit}"] = format_reset(window.wait_for(amount, now))
        return headers

    def _anthropic_ratelimit_headers(self, charge: int, now: float) -> dict[str, str]:
        """Anthropic-style anthropic-ratelimit-* headers for the limits that are set."""
        headers: dict[str, str] = {}
        for unit, window, amount in (("requests", self.rpm, 1), ("tokens", self.tpm, charge)):
            if window.limit is None:
                continue
            reset = datetime.now(UTC) + timedelta(seconds=window.wait_for(amount, now))
            headers[f"anthropic-ratelimit-{unit}-limit"] = str(window.limit)
            headers[f"anthropic-ratelimit-{unit}-remaining"] = str(window.remaining(now))
            headers[f"anthropic-ratelimit-{unit}-reset"] = reset.isoformat(timespec="seconds")
        return headers

    def _success_headers(self, call: Call) -> dict[str, str]:
        """Request id plus the API's rate-limit headers for a successful answer."""
        now = self.clock()
        charge = self._arrival_charge(call)
        if self.cfg.api == "anthropic":
            return {
                "request-id": f"req_{call.rid}",
                **self._anthropic_ratelimit_headers(charge, now),
            }
        return {"x-request-id": f"req_{call.rid}", **self._ratelimit_headers(charge, now)}

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        """Accept the request and never answer, until the client leaves (or 600 s pass)."""
        self.stats.record("faults", None)
        deadline = time.monotonic() + HANG_LIMIT_S
        # aiohttp neither cancels handlers on disconnect by default nor offers a disconnect
        # event, so polling the transport is the only way to notice the client leaving.
        while client_connected(request) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(HANG_POLL_S)
        return drop_connection(request)

    def _delay(self, base_ms: float) -> float:
        """``base_ms`` with uniform +/- jitter, in seconds, never negative."""
        jitter = self.cfg.jitter_ms
        offset = self.rng.uniform(-jitter, jitter) if jitter else 0.0
        return max(0.0, base_ms + offset) / 1000.0

    async def _answer(
        self, request: web.Request, call: Call, cut: int | None
    ) -> web.StreamResponse:
        """Produce the successful answer (optionally cut short by a fault)."""
        comp = plan_completion(self.cfg.completion_tokens, call)
        final = self._respond(call, comp) if call.kind == "responses" else None
        if call.stream:
            return await self._stream(request, call, stream_frames(call, comp, final), cut)
        await asyncio.sleep(self._delay(self.cfg.latency_ms))
        body = orjson.dumps(final if final is not None else answer_body(call, comp))
        if cut is not None:
            return await self._cut_body(request, call, body)
        self._settle(call, comp.output_tokens)
        self.stats.record("ok", 200)
        return web.Response(
            body=body, content_type="application/json", headers=self._success_headers(call)
        )

    def _respond(self, call: Call, comp: Completion) -> dict[str, Any]:
        """The Responses API's response object, stored (unless store is false) before it is sent
        so that a follow-up can name it as soon as the client has its id."""
        final = response_body(call, comp)
        if final["store"]:
            self.responses.put(final)
        return final

    async def _cut_body(self, request: web.Request, call: Call, body: bytes) -> web.StreamResponse:
        """cut_stream on a non-streamed answer: send half the announced body, then disconnect."""
        resp = web.StreamResponse(headers=self._success_headers(call))
        resp.content_type = "application/json"
        resp.content_length = len(body)
        await resp.prepare(request)
        self.stats.record("faults", 200)
        await resp.write(body[: len(body) // 2])
        return drop_connection(request, resp)

    def _paced(self, frames: Iterable[Frame]) -> Iterator[tuple[float, bytes, int]]:
        """Stream frames with the pause before each: TTFT first, then the inter-token gap."""
        ttft = self.cfg.latency_ms if self.cfg.ttft_ms is None else self.cfg.ttft_ms
        gap = self.cfg.chunk_interval_ms / 1000.0
        first_token = True
        for index, (frame, tokens) in enumerate(frames):
            delay = self._delay(ttft) if index == 0 else 0.0
            if tokens:
                delay += 0.0 if first_token else gap
                first_token = False
            yield delay, frame, tokens

    async def _stream(
        self, request: web.Request, call: Call, source: Iterable[Frame], cut: int | None
    ) -> web.StreamResponse:
        """Send the answer as paced SSE frames, each written to the socket on its own."""
        headers = {
            **self._success_headers(call),
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        }
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        self.stats.record(None, 200)
        frames: Iterable[tuple[float, bytes, int]] = self._paced(source)
        if cut is not None:
            frames = itertools.islice(frames, cut)
        tokens, stayed = await self._pump(resp, frames)
        self._settle(call, tokens)
        if not stayed:
            self.stats.record("disconnects", None)
            return resp
        if cut is not None:
            self.stats.record("faults", None)
            return drop_connection(request, resp)
        self.stats.record("ok", None)
        return resp

    @staticmethod
    async def _pump(
        resp: web.StreamResponse, frames: Iterable[tuple[float, bytes, int]]
    ) -> tuple[int, bool]:
        """Write frames with their pauses; return tokens sent and whether the client stayed."""
        sent = 0
        for delay, frame, tokens in frames:
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await resp.write(frame)
            except ConnectionError:
                return sent, False
            sent += tokens
        return sent, True

    async def _models(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/models in the configured API's shape."""
        self._note(request, api=False)
        # an outage takes the whole server down, not just the completion endpoints (a probe
        # of /models must see it), unless its scope is the API only
        outage = await self._outage(request, ("all",))
        if outage is not None:
            return outage
        try:
            self._check_headers(request)
        except ApiError as err:
            return self._json(err.body(self.cfg.api), status=err.status)
        return self._json(model_list(self.cfg))

    async def _outage(
        self, request: web.Request, scopes: Iterable[str] = FAULT_SCOPES
    ) -> web.StreamResponse | None:
        """The armed outage's answer to a request outside the POST path, if it reaches it.

        Counted faults stay reserved for API POSTs, so this never consumes one.
        """
        if self.fault.scope not in scopes:
            return None
        if self.fault.mode == "error":
            err = ApiError(self.fault.status, f"Injected fault: HTTP {self.fault.status}")
            return self._json(err.body(self.cfg.api), status=err.status)
        if self.fault.mode == "close":
            return drop_connection(request)
        if self.fault.mode == "hang":
            return await self._hang(request)
        return None

    def snapshot(self) -> dict[str, Any]:
        """The GET /stats document."""
        now = self.clock()
        stats = asdict(self.stats)
        stats["arrivals"] = list(self.stats.arrivals)
        return {
            "name": self.cfg.name,
            "api": self.cfg.api,
            **stats,
            "rpm_window": self.rpm.current(now),
            "tpm_window": self.tpm.current(now),
            "rpm_peak": self.rpm.peak,
            "tpm_peak": self.tpm.peak,
            "fault": self.fault.mode,
        }

    async def _get_stats(self, request: web.Request) -> web.StreamResponse:
        """GET /stats."""
        return self._json(self.snapshot())

    async def _reset_stats(self, request: web.Request) -> web.StreamResponse:
        """POST /stats/reset: zero the counters and empty both windows."""
        # in_flight is a live gauge, not a counter: requests still running will decrement it.
        live = self.stats.in_flight
        self.stats = Stats(in_flight=live, in_flight_peak=live)
        self.rpm.clear()
        self.tpm.clear()
        return self._json(self.snapshot())

    async def _get_fault(self, request: web.Request) -> web.StreamResponse:
        """GET /admin/fault."""
        return self._json(asdict(self.fault))

    async def _set_fault(self, request: web.Request) -> web.StreamResponse:
        """POST /admin/fault: arm (or, with mode none, disarm) a fault."""
        try:
            data = orjson.loads(await request.read() or b"{}")
            if not isinstance(data, dict):
                raise TypeError("body must be a JSON object")
            self.fault = Fault.from_json(data)
        except (ValueError, TypeError) as exc:
            return self._json({"error": str(exc)}, status=400)
        return self._json(asdict(self.fault))

    @staticmethod
    def _json(
        payload: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        """A JSON response serialised with orjson."""
        return web.Response(
            body=orjson.dumps(payload),
            status=status,
            content_type="application/json",
            headers=headers,
        )


PROVIDER_KEY = web.AppKey("mock_provider", MockProvider)


def build_app(cfg: MockConfig) -> web.Application:
    """The aiohttp application of a mock provider; its state is at ``app[PROVIDER_KEY]``."""
    provider = MockProvider(cfg)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[PROVIDER_KEY] = provider
    app.add_routes(provider.routes())
    return app


async def start_server(cfg: MockConfig) -> tuple[web.AppRunner, int]:
    """Start serving ``cfg`` in this event loop; return the runner and the real port."""
    runner = web.AppRunner(build_app(cfg), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=_tls_context(cfg))
    await site.start()
    return runner, int(runner.addresses[0][1])


def _tls_context(cfg: MockConfig) -> ssl.SSLContext | None:
    """The server's TLS context when ``--tls-cert`` is given (client certs required with
    ``--tls-client-ca``)."""
    if cfg.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_client_ca is not None:
        ctx.load_verify_locations(cfg.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def serve(cfg: MockConfig) -> None:
    """Run until SIGINT/SIGTERM, announcing the listening URL on stdout."""
    runner, port = await start_server(cfg)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    scheme = "https" if cfg.tls_cert else "http"
    print(f"mock-provider {cfg.name} listening on {scheme}://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def parse_args(argv: list[str] | None = None) -> MockConfig:
    """Command line -> MockConfig."""
    p = argparse.ArgumentParser(prog="python -m loadtest.mock_provider", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--name", default="mock")
    p.add_argument("--api", choices=APIS, default="openai")
    p.add_argument("--latency-ms", type=float, default=0.0, help="mean non-stream latency")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- jitter")
    p.add_argument("--ttft-ms", type=float, default=None, help="default: --latency-ms")
    p.add_argument("--chunk-interval-ms", type=float, default=0.0)
    p.add_argument("--completion-tokens", type=int, default=16)
    p.add_argument("--prompt-token-scale", type=float, default=1.0,
                   help="report this many times the estimated prompt tokens")  # fmt: skip
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--error-status", type=int, default=500)
    p.add_argument("--rpm", type=int, default=None, help="0/unset = unlimited")
    p.add_argument("--tpm", type=int, default=None, help="0/unset = unlimited")
    p.add_argument("--tpm-accounting", choices=ACCOUNTING, default="reserved")
    p.add_argument("--api-key", default=None)
    p.add_argument("--fault", choices=FAULT_MODES, default="none")
    p.add_argument("--seed", type=int, default=None, help="seed for jitter and error rate")
    p.add_argument("--tls-cert", default=None, help="serve HTTPS with this cert (PEM)")
    p.add_argument("--tls-key", default=None, help="the --tls-cert's key (PEM)")
    p.add_argument("--tls-client-ca", default=None, help="require client certs of this CA")
    return MockConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m loadtest.mock_provider``."""
    cfg = parse_args(argv)
    asyncio.run(serve(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
