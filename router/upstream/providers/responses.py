"""The OpenAI Responses API (``/v1/responses``, Codex's API), passed through to openai-kind
providers.

Nothing is translated: the client's body goes upstream with ``model`` replaced, and the
answer (whole or streamed) comes back byte for byte. What this module adds is what the
router needs to read on the way: the request's routing fields (checked, a 400 naming the
field otherwise), the answer's id (pinned to its provider so that ``previous_response_id``
and ``GET``/``DELETE /v1/responses/{id}`` reach the one that stored it) and its usage.

A streamed answer ends with one terminal event (``response.completed``, ``.incomplete`` or
``.failed``). ``ResponsesStream.feed`` holds that event back, and what follows it, until
the caller takes it with ``terminal()``: a client that sees ``response.completed`` may
send its next turn (``previous_response_id``) at once, to any replica, so the id must be
pinned before the client can see the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from router.config import Provider
from router.errors import BadRequest, UpstreamProtocolError
from router.tokens import PER_MESSAGE, PRIMING
from router.upstream.providers import _common
from router.upstream.providers.base import Translated, UpstreamRequest, Usage
from router.upstream.providers.openai import OpenAIAdapter

PATH = "/responses"
"""Relative to an openai-kind ``base_url`` (which ends in ``/v1``), like ``/chat/completions``."""
MAX_INPUT_ITEMS = 10_000
"""Items in a list ``input``: a Codex session's history is hundreds; each item is checked
(it must be an object) and counted for the estimate, so the list is bounded like chat's."""
MAX_OUTPUT_TOKENS = 1_000_000
"""The largest ``max_output_tokens`` accepted (chat's bound, ``router.api.schemas``)."""
MAX_ID_CHARS = 128
"""The longest response id accepted (OpenAI's are ``resp_`` and 50 hex digits)."""

# An id becomes part of a Redis key (``|`` is its separator) and of an upstream URL:
# printable ASCII without space or ``|``; the URL percent-encodes it, and "." / ".." (which
# a server would read as path steps) are refused.
_ID = re.compile(r"[\x21-\x7b\x7d\x7e]+")  # printable ASCII but space and "|" (0x7c)
_DOTS = frozenset({".", ".."})

_OPENAI = OpenAIAdapter()


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """What the router reads of a ``POST /v1/responses`` body (the rest passes through)."""

    model: str
    stream: bool
    previous_response_id: str | None
    max_output_tokens: int | None
    store: bool
    """Whether the provider keeps the answer (the API's default: true): only then is its id
    worth pinning."""


def response_id_ok(raw: str) -> bool:
    """Whether ``raw`` is a sane response id: 1 to 128 printable ASCII characters, no
    whitespace, no ``|``, not ``.`` or ``..``."""
    return 0 < len(raw) <= MAX_ID_CHARS and raw not in _DOTS and _ID.fullmatch(raw) is not None


def _bad(param: str, message: str) -> BadRequest:
    return BadRequest(f"invalid value for '{param}': {message}", param=param)


def _optional_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "must be an integer")
    if not 1 <= value <= MAX_OUTPUT_TOKENS:
        raise _bad(name, f"must be between 1 and {MAX_OUTPUT_TOKENS}")
    return value


def _optional_bool(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, "must be a boolean")
    return value


def _check_input(value: Any) -> None:
    """``input``: absent, a string, or a list of at most ``MAX_INPUT_ITEMS`` objects."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _bad("input", "must be a string or a list of input items")
    if len(value) > MAX_INPUT_ITEMS:
        raise _bad("input", f"must have at most {MAX_INPUT_ITEMS} items")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _bad(f"input[{i}]", "must be an object")


def check_responses(data: Any) -> ResponsesRequest:
    """Check what the router reads of a Responses body; ``BadRequest`` (with ``param``) if not.

    ``input`` may be absent, as the API allows (a stored prompt, or a turn that only
    continues ``previous_response_id`` or a ``conversation``): the provider judges that.
    """
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "must be a non-empty string")
    _check_input(data.get("input"))
    previous = data.get("previous_response_id")
    if previous is not None and not (isinstance(previous, str) and response_id_ok(previous)):
        raise _bad(
            "previous_response_id",
            f"must be a response id: 1 to {MAX_ID_CHARS} printable ASCII characters, "
            "without whitespace or '|'",
        )
    return ResponsesRequest(
        model=model,
        stream=_optional_bool(data, "stream", False),
        previous_response_id=previous,
        max_output_tokens=_optional_int(data, "max_output_tokens"),
        store=_optional_bool(data, "store", True),
    )


def request(provider: Provider, model: str, body: dict[str, Any]) -> UpstreamRequest:
    """``POST {base_url}/responses``: the client's body with ``model`` replaced."""
    headers = {"content-type": "application/json", **_OPENAI.headers(provider)}
    return UpstreamRequest(
        _common.api_url(provider, PATH), headers, _common.dump_json({**body, "model": model})
    )


def _item_request(provider: Provider, response_id: str, method: str) -> UpstreamRequest:
    if not response_id_ok(response_id):
        raise BadRequest("not a response id", param="response_id")
    url = _common.api_url(provider, f"{PATH}/{quote(response_id, safe='')}")
    return UpstreamRequest(url, _OPENAI.headers(provider), b"", method)


def get_request(provider: Provider, response_id: str) -> UpstreamRequest:
    """The request for ``GET {base_url}/responses/{id}`` (no body)."""
    return _item_request(provider, response_id, "GET")


def delete_request(provider: Provider, response_id: str) -> UpstreamRequest:
    """The request for ``DELETE {base_url}/responses/{id}`` (no body)."""
    return _item_request(provider, response_id, "DELETE")


def _usage(response: Any) -> Usage | None:
    """A Response object's ``usage`` (input -> prompt, output -> completion), if it has one."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    return Usage(
        _common.as_int(usage.get("input_tokens")), _common.as_int(usage.get("output_tokens"))
    )


def _id(response: Any) -> str | None:
    value = response.get("id") if isinstance(response, dict) else None
    return value if isinstance(value, str) and response_id_ok(value) else None


def response(payload: bytes) -> tuple[Translated, str | None]:
    """A 200 Response object, unchanged, with its usage and its id (``None`` if absent or not
    a sane id); ``UpstreamProtocolError`` if it is not a JSON object."""
    obj = _common.load_json(payload)
    return Translated(body=payload, usage=_usage(obj)), _id(obj)


def error_event(message: str, code: str, sequence_number: int = 0) -> bytes:
    """An ``error`` event in the Responses stream's shape (``ResponseErrorEvent``): how a
    failure after the first byte reaches the client. ``sequence_number``: the stream's next
    (``ResponsesStream.next_sequence``)."""
    event = {
        "type": "error",
        "code": code,
        "message": _common.clean_message(message),
        "param": None,
        "sequence_number": sequence_number,
    }
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


def _text_chars(content: Any) -> int:
    """Characters of a message's content: its text parts' text, any other part's JSON."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            else len(orjson.dumps(part))
            for part in content
        )
    return 0 if content is None else len(orjson.dumps(content))


def _item_chars(item: Any) -> int:
    """A message's content as chat counts it; any other item (a function call, its output,
    reasoning, ...) by the length of its JSON, as chat counts tool calls."""
    if isinstance(item, dict) and "content" in item:
        return _text_chars(item["content"])
    return len(item) if isinstance(item, str) else len(orjson.dumps(item))


def prompt_estimate(body: dict[str, Any]) -> int:
    """The prompt tokens of a Responses body, by ``router.tokens``' rule: ``ceil(chars / 4)``,
    plus 4 per input item (a string input is one) and for ``instructions``, plus 3."""
    value = body.get("input")
    items = value if isinstance(value, list) else [] if value is None else [value]
    chars = sum(_item_chars(item) for item in items)
    count = len(items)
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        chars += len(instructions)
        count += 1
    if body.get("tools"):
        chars += len(orjson.dumps(body["tools"]))
    return (chars + 3) // 4 + PER_MESSAGE * count + PRIMING


_DELTAS = frozenset(
    {
        b"response.output_text.delta",
        b"response.refusal.delta",
        b"response.function_call_arguments.delta",
        b"response.custom_tool_call_input.delta",
        b"response.reasoning_text.delta",
        b"response.reasoning_summary_text.delta",
        b"response.audio.delta",
        b"response.audio.transcript.delta",
        b"response.code_interpreter_call_code.delta",
        b"response.mcp_call_arguments.delta",
    }
)
"""Events that carry generated output (what ``content_chunks`` counts)."""
_TERMINAL = {
    b"response.completed": "completed",
    b"response.incomplete": "incomplete",
    b"response.failed": "failed",
}
_STARTS = frozenset({b"response.created", b"response.queued", b"response.in_progress"})
_ERROR = b"error"
_PARSED = _STARTS | _TERMINAL.keys() | {_ERROR}
"""Events whose JSON the router reads; the others are only scanned for their number."""
_DONE = b"[DONE]"
# A JSON key is never inside a string unescaped, so this finds the event's own number
# without parsing the event (deltas are most events: they are not parsed).
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d{1,15})\b')


class ResponsesStream:
    """Relays a Responses SSE stream event by event, unchanged, reading what the router needs.

    ``feed`` returns every event it completes, in order, up to the first terminal event
    (``response.completed``, ``.incomplete``, ``.failed``); from there on it returns b"" and
    holds the terminal event and whatever follows it (``data: [DONE]``), until ``terminal()``
    hands them over; after that ``feed`` relays again. ``close()`` returns what was never
    handed over: the held events (if ``terminal()`` was not called), then a last event that
    lacked its blank line, completed with one (dropped if unreadable: a stream cut mid-event
    is not finished, and the caller sends ``error_event`` instead). A caller that must pin the
    id before the client sees the end calls ``terminal()`` only once it has, and pins before
    sending ``close()``'s bytes too when ``finished`` became true in ``close()``.

    An ``error`` event is relayed; ``failed`` then holds its code (``finished`` stays false).
    """

    __slots__ = (
        "_after",
        "_held",
        "_max",
        "_sequence",
        "_splitter",
        "_taken",
        "content_chunks",
        "failed",
        "failed_message",
        "finished",
        "response_id",
        "status",
        "usage",
    )

    def __init__(self, max_event_bytes: int = _common.MAX_EVENT_BYTES) -> None:
        self._splitter = _common.EventSplitter(max_event_bytes)
        self._max = max_event_bytes
        self._held: list[bytes] = []
        self._after = 0  # bytes held after the terminal event (bounded by max_event_bytes)
        self._taken = False
        self._sequence = -1
        self.usage: Usage | None = None
        """From the terminal event's ``response.usage`` (``None`` until then, or if absent)."""
        self.content_chunks = 0
        self.finished = False
        """A terminal event arrived (``status`` says which)."""
        self.status: str | None = None
        """``completed``, ``incomplete`` or ``failed``: the terminal event's kind."""
        self.response_id: str | None = None
        """The id of ``response.created`` (else of a later lifecycle event), if sane."""
        self.failed: str | None = None
        """The ``code`` of an ``error`` event the provider sent (``"error"`` if it had none)."""
        self.failed_message: str | None = None
        """That event's message, cleaned and capped (for logs)."""

    @property
    def events(self) -> int:
        """Complete SSE events read so far, keep-alives included."""
        return self._splitter.events

    @property
    def terminal_pending(self) -> bool:
        """The terminal event has arrived and is held: ``terminal()`` would return it."""
        return bool(self._held) and not self._taken

    @property
    def next_sequence(self) -> int:
        """The ``sequence_number`` an event appended now should carry (``error_event``)."""
        return self._sequence + 1

    def feed(self, data: bytes) -> bytes:
        """The events ``data`` completes, in order, up to (not including) the terminal one."""
        buf, ends = self._splitter.push(data)
        start = 0
        relay_end = 0
        for end in ends:
            if end - start > self._max:  # the splitter bounds only what it holds
                raise UpstreamProtocolError(
                    f"the provider sent an SSE event over {self._max} bytes"
                )
            holding = self.finished and not self._taken
            if not holding:
                self._read(buf, start, end)
                holding = self.finished and not self._taken
            if holding:
                self._hold(buf[start:end])
            else:
                relay_end = end
            start = end
        return buf[:relay_end] if relay_end < len(buf) else buf

    def terminal(self) -> bytes:
        """The held terminal event and the events after it, once (b"" if none is held)."""
        if not self.finished or self._taken:
            return b""
        self._taken = True
        held, self._held = b"".join(self._held), []
        return held

    def close(self) -> bytes:
        """What was never returned: held events (see ``terminal``), then a last event without
        its blank line, if readable."""
        out = self.terminal()
        tail = self._splitter.rest().strip(b"\r\n")
        if tail and self._readable(tail):
            self._read(tail, 0, len(tail))
            out += tail + b"\n\n"
        return out

    def _hold(self, event: bytes) -> None:
        if self._held:
            self._after += len(event)
            if self._after > self._max:
                raise UpstreamProtocolError(
                    f"the provider sent over {self._max} bytes after the stream's final event"
                )
        self._held.append(event)

    def _read(self, buf: bytes, start: int, end: int) -> None:
        """Account for the event ``buf[start:end]``."""
        name, data = _common.sse_fields(buf[start:end])
        if data is None or data == _DONE:
            return
        if name is not None and name not in _PARSED:  # most events: deltas, left unparsed
            if name in _DELTAS:
                self.content_chunks += 1
            self._see_sequence(data)
            return
        try:  # an event the router reads, or one without an ``event:`` line
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        kind = obj.get("type") if isinstance(obj, dict) else None
        self._event(name or (kind.encode() if isinstance(kind, str) else b""), obj)

    def _event(self, name: bytes, obj: Any) -> None:
        """Account for a parsed event (``obj`` is ``None`` if its data was unreadable)."""
        if not isinstance(obj, dict):
            obj = {}
        number = obj.get("sequence_number")
        if isinstance(number, int) and not isinstance(number, bool):
            self._sequence = max(self._sequence, number)
        response = obj.get("response")
        if name in _DELTAS:
            self.content_chunks += 1
        elif name in _STARTS:
            self.response_id = self.response_id or _id(response)
        elif name in _TERMINAL and not self.finished:  # a second one changes nothing
            self.finished = True
            self.status = _TERMINAL[name]
            self.usage = _usage(response)
            self.response_id = self.response_id or _id(response)
        elif name == _ERROR:
            code = obj.get("code")
            message = obj.get("message")
            self.failed = code if isinstance(code, str) and code else "error"
            self.failed_message = _common.clean_message(message if isinstance(message, str) else "")

    def _see_sequence(self, data: bytes) -> None:
        found = _SEQUENCE.search(data)
        if found is not None:
            self._sequence = max(self._sequence, int(found[1]))

    @staticmethod
    def _readable(event: bytes) -> bool:
        """Whether a last event without its blank line is whole: a comment, ``[DONE]``, or
        JSON data (a stream cut mid-event leaves JSON that does not parse)."""
        _, data = _common.sse_fields(event)
        if data is None or data == _DONE:
            return True
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        return True
