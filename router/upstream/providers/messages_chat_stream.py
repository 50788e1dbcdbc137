"""An OpenAI chat stream (``chat.completion.chunk`` SSE) as an Anthropic Messages stream.

Out go Anthropic's events, each ``event: <type>\\ndata: <json>\\n\\n``:

- ``message_start`` at the first chunk (the message with empty content; usage zero, as
  OpenAI reports usage only at the end);
- per run of text: ``content_block_start`` (``text: ""``), a ``text_delta`` per chunk,
  ``content_block_stop`` when a tool call starts or the answer ends;
- per tool call: ``content_block_start`` (``tool_use``: its id, name, ``input: {}``), an
  ``input_json_delta`` per piece of ``arguments`` (passed as they come: a model's malformed
  arguments reach the client as they are, unlike a whole answer's, which are wrapped),
  ``content_block_stop``;
- ``message_delta`` (``stop_reason`` as in ``messages_from_chat``, ``stop_sequence`` null,
  the usage) and ``message_stop`` once both the finish reason and the usage chunk have come
  (the request asked for ``include_usage``), or at ``[DONE]`` if they have not.

``finished`` is set with ``message_stop``; a stream that ends before gets no invented end.
An ``error`` object in the stream, and tool calls interleaved (a block once closed cannot be
reopened), are an ``UpstreamProtocolError``. Reasoning text is dropped, as in whole answers.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from router.errors import UpstreamProtocolError
from router.upstream.providers import _common
from router.upstream.providers.messages_from_chat import message_id, stop_reason, usage_json

_DONE = b"[DONE]"
_TEXT = -1
"""The open block is text (a tool call's block is its OpenAI index: 0 or more)."""


def frame(kind: str, obj: dict[str, Any]) -> bytes:
    """One Anthropic SSE event."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class ChatToMessagesStream(_common.EventTranslator):
    """Translates an OpenAI chat stream into Anthropic's Messages events, incrementally."""

    def __init__(self, model: str, max_event_bytes: int = _common.MAX_EVENT_BYTES) -> None:
        self._model = model
        super().__init__(max_event_bytes)
        self._started = False
        self._blocks = 0  # content blocks opened so far
        self._open: int | None = None  # the open block: _TEXT, a tool call's index, or none
        self._tools: set[int] = set()  # tool call indexes seen
        self._finish: Any = None  # the finish reason, once it came
        self._usage_obj: dict[str, int] | None = None

    def _event(self, event: bytes) -> bytes:
        _, data = _common.sse_fields(event)
        if data is None or self.finished:
            return b""  # a comment, or anything after the end
        if data.strip() == _DONE:
            return self._start({}) + self._end()
        obj = _common.load_json(data, "invalid JSON in its stream")
        if "error" in obj:
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamProtocolError(
                _common.clean_message(f"the provider streamed an error: {message}")
            )
        try:
            return self._chunk(obj)
        except orjson.JSONEncodeError:
            raise UpstreamProtocolError("provider streamed JSON nested too deep") from None

    def _start(self, obj: dict[str, Any]) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict[str, Any] = {
            "id": message_id(obj.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return frame("message_start", {"type": "message_start", "message": message})

    def _chunk(self, obj: dict[str, Any]) -> bytes:
        out = [self._start(obj)]
        choices = obj.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if isinstance(choice, dict):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                out.append(self._text(delta.get("content")))
                out.extend(self._tool_call(call) for call in _tool_calls(delta))
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
                out.append(self._close_block())
        if isinstance(obj.get("usage"), dict):
            self.usage, self._usage_obj = usage_json(obj)
        if self._finish is not None and self._usage_obj is not None:
            out.append(self._end())
        return b"".join(out)

    def _text(self, text: Any) -> bytes:
        if not isinstance(text, str) or not text:
            return b""
        out = b""
        if self._open != _TEXT:
            out = self._open_block({"type": "text", "text": ""}, _TEXT)
        self.content_chunks += 1
        delta = {"type": "text_delta", "text": text}
        return out + self._delta(delta)

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        index = call.get("index")
        index = index if isinstance(index, int) and index >= 0 else 0
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        out = b""
        if index not in self._tools:
            out = self._open_tool(index, call.get("id"), fn.get("name"))
        elif self._open != index:
            raise UpstreamProtocolError("provider streamed interleaved tool calls")
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            self.content_chunks += 1
            out += self._delta({"type": "input_json_delta", "partial_json": arguments})
        return out

    def _open_tool(self, index: int, call_id: Any, name: Any) -> bytes:
        if not isinstance(name, str) or not name:
            raise UpstreamProtocolError("provider streamed a tool call without a name")
        self._tools.add(index)
        block = {
            "type": "tool_use",
            "id": call_id if isinstance(call_id, str) and call_id else f"toolu_{uuid.uuid4().hex}",
            "name": name,
            "input": {},
        }
        return self._open_block(block, index)

    def _open_block(self, block: dict[str, Any], kind: int) -> bytes:
        out = self._close_block()
        self._open = kind
        self._blocks += 1
        start = {"type": "content_block_start", "index": self._blocks - 1, "content_block": block}
        return out + frame("content_block_start", start)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        event = {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}
        return frame("content_block_delta", event)

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        stop = {"type": "content_block_stop", "index": self._blocks - 1}
        return frame("content_block_stop", stop)

    def _end(self) -> bytes:
        """``message_delta`` and ``message_stop``; the stream is finished."""
        self.finished = True
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": stop_reason(self._finish, bool(self._tools)),
                "stop_sequence": None,
            },
            "usage": self._usage_obj or usage_json({})[1],
        }
        stop = frame("message_stop", {"type": "message_stop"})
        return self._close_block() + frame("message_delta", delta) + stop


def _tool_calls(delta: dict[str, Any]) -> list[dict[str, Any]]:
    calls = delta.get("tool_calls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
