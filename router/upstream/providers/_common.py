"""Small helpers the provider adapters share: SSE framing, header values, error text.

Everything here is pure and cheap; the SSE splitter runs once per upstream chunk of every
streamed answer, so it scans each byte a bounded number of times and copies nothing it
does not have to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from router.config import Bounds, Provider
from router.errors import BadRequest, UpstreamProtocolError
from router.upstream.providers.base import Usage

MAX_MESSAGE = 300
"""The longest error message an adapter returns (upstream bodies may be huge or hostile)."""
MAX_EVENT_BYTES = Bounds().max_event_bytes
"""One SSE event's bound when none is given (``Provider.bounds.max_event_bytes``)."""

_LF_END = b"\n\n"
_CRLF_END = b"\r\n\r\n"
# The longest terminator minus one: a terminator may straddle two chunks by this much.
_OVERLAP = len(_CRLF_END) - 1


def event_end(buf: bytes, pos: int) -> int:
    """The offset just past the first SSE event terminator at or after ``pos``, or -1."""
    lf = buf.find(_LF_END, pos)
    # Look for CRLF only before the first LF pair, so a long LF-framed buffer is not
    # rescanned to its end for every event.
    crlf = buf.find(_CRLF_END, pos, len(buf) if lf < 0 else lf + 2)
    if crlf >= 0:
        return crlf + 4
    return lf + 2 if lf >= 0 else -1


class EventSplitter:
    """Cuts a byte stream into complete SSE events, keeping the incomplete tail.

    The tail is kept as the list of chunks it arrived in and joined once, when its event
    completes: re-joining it on every chunk made one large event quadratic (an 8 MiB event
    in 16 KiB chunks took 1.8 s of CPU, 64 MiB in 64 KiB chunks 25.5 s, all on the event
    loop). An event longer than ``max_event_bytes`` is the provider's fault.
    """

    __slots__ = ("_held", "_last", "_max", "_parts", "events")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._parts: list[bytes] = []
        self._held = 0
        self._last = b""  # the tail's last bytes: where a terminator may begin
        self._max = max_event_bytes
        self.events = 0
        """Complete events so far (keep-alive comments included): the stream's pulse."""

    def push(self, data: bytes) -> tuple[bytes, list[int]]:
        """Append ``data``; return the buffer and the end offset of each complete event in it.

        Event ``i`` is ``buf[ends[i - 1]:ends[i]]`` (from 0 for the first), terminator included.
        Raises ``UpstreamProtocolError`` when the incomplete event grows past the bound.
        """
        if self._parts:
            first = self._first_end(data)
            if first < 0:
                self._hold(data)
                return data, []
            self._parts.append(data)
            buf = b"".join(self._parts)
            first += self._held
            self._parts, self._held, self._last = [], 0, b""
        else:  # the common case (the last chunk ended on an event boundary) copies nothing
            buf = data
            first = event_end(buf, 0)
        ends: list[int] = []
        end = first
        while end >= 0:
            ends.append(end)
            end = event_end(buf, end)
        start = ends[-1] if ends else 0
        if start < len(buf):
            self._hold(buf[start:] if start else buf)
        self.events += len(ends)
        return buf, ends

    def _first_end(self, data: bytes) -> int:
        """Where, in ``data``, the held event's terminator ends (-1: not in ``data``)."""
        # A terminator may straddle the held tail and ``data``; it then ends in data[:3].
        seam = self._last + data[:_OVERLAP]
        end = event_end(seam, 0)
        if end >= 0:
            return end - len(self._last)
        return event_end(data, 0)

    def _hold(self, data: bytes) -> None:
        if not data:
            return
        self._parts.append(data)
        self._held += len(data)
        if self._held > self._max:
            raise UpstreamProtocolError(f"the provider sent an SSE event over {self._max} bytes")
        self._last = data[-_OVERLAP:] if len(data) >= _OVERLAP else (self._last + data)[-_OVERLAP:]

    def rest(self) -> bytes:
        """Take the incomplete tail (the stream ended without a final blank line)."""
        tail = b"".join(self._parts)
        self._parts, self._held, self._last = [], 0, b""
        return tail


class EventTranslator:
    """A stream translator that works one complete SSE event at a time: ``_event`` says what
    an event becomes; ``feed`` and ``close`` split the bytes into events (bounded by
    ``max_event_bytes``) and join what they become. A subclass that relays bytes as they came
    overrides ``feed`` and ``close`` too."""

    __slots__ = ("_splitter", "content_chunks", "finished", "usage")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._splitter = EventSplitter(max_event_bytes)
        self.usage: Usage | None = None
        self.content_chunks = 0
        self.finished = False

    @property
    def events(self) -> int:
        """Complete SSE events read so far (keep-alives and pings included)."""
        return self._splitter.events

    def feed(self, data: bytes) -> bytes:
        """What every event that ``data`` completes becomes, in order."""
        buf, ends = self._splitter.push(data)
        out: list[bytes] = []
        start = 0
        for end in ends:
            out.append(self._event(buf[start:end]))
            start = end
        return b"".join(out)

    def close(self) -> bytes:
        """What a last event that lacked its blank line becomes; nothing is invented."""
        tail = self._splitter.rest()
        return self._event(tail) if tail.strip() else b""

    def _event(self, event: bytes) -> bytes:
        raise NotImplementedError


def sse_fields(event: bytes) -> tuple[bytes | None, bytes | None]:
    """The ``event:`` name and the joined ``data:`` lines of one SSE event (None if absent)."""
    name: bytes | None = None
    data: list[bytes] = []
    for raw in event.split(b"\n"):
        line = raw.rstrip(b"\r")
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    return name, (b"\n".join(data) if data else None)


def load_json(payload: bytes, what: str = "invalid JSON") -> dict[str, Any]:
    """Parse a provider's JSON object; raise ``UpstreamProtocolError`` if it is not one."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"provider answered with {what}") from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError("provider answered with an unexpected shape: not an object")
    return obj


def dump_json(obj: Any) -> bytes:
    """Serialize an outgoing body; raise ``BadRequest`` if it cannot be (e.g. huge integers)."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:
        raise BadRequest(f"request body cannot be serialized: {exc}") from None


def api_url(provider: Provider, path: str) -> str:
    """``provider.base_url`` joined with ``path`` (which starts with a slash)."""
    return provider.base_url.rstrip("/") + path


def api_key(provider: Provider) -> str | None:
    """The provider's resolved key, if it has one."""
    return None if provider.api_key is None else provider.api_key.value.get_secret_value()


def client_wants_usage(body: Mapping[str, Any]) -> bool:
    """Whether an OpenAI body asked for the final usage chunk of a stream."""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def as_int(value: Any) -> int:
    """A token count from a JSON value; anything else (null, bool, text) counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def openai_usage(obj: Mapping[str, Any]) -> Usage | None:
    """The ``usage`` of an OpenAI-shaped object, if it reports one."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    return Usage(as_int(usage.get("prompt_tokens")), as_int(usage.get("completion_tokens")))


MAX_VALUE = 64
"""The longest rate-limit header value read (a duration, date or count is far shorter): a
hostile 64 KiB value of ``1s1s...`` took 57 ms of the event loop to parse."""


def _finite(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_int(value: str | None) -> int | None:
    """A non-negative integer header value, or None."""
    if value is None or len(value) > MAX_VALUE:
        return None
    number = _finite(value.strip())
    return int(number) if number is not None and number >= 0 else None


_UNITS_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# "ms" before "m" and "s": alternation takes the first arm that matches.
_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)"
_DURATION = re.compile(f"(?:{_PART})+")
_DURATION_PART = re.compile(_PART)


def parse_duration(value: str | None) -> float | None:
    """Seconds in an OpenAI (Go-style) duration such as ``6m0s``, ``20ms``; a bare number too."""
    if value is None or len(value) > MAX_VALUE:
        return None
    text = value.strip()
    number = _finite(text)
    if number is not None:
        return number if number >= 0 else None
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(n) * _UNITS_S[unit] for n, unit in _DURATION_PART.findall(text))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: a number or an HTTP date (never < 0)."""
    if value is None or len(value) > MAX_VALUE:
        return None
    number = _finite(value.strip())
    if number is not None:
        return max(0.0, number)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return _seconds_until(when, now)


def parse_timestamp(value: str | None, now: float) -> float | None:
    """Seconds from ``now`` until an RFC 3339 timestamp (never < 0), or None."""
    if value is None or len(value) > MAX_VALUE:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return _seconds_until(when, now)


def _seconds_until(when: datetime, now: float) -> float:
    if when.tzinfo is None:  # HTTP dates are GMT; a zone-less timestamp is taken as UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# Enough bytes for MAX_MESSAGE characters of UTF-8 (at most 4 bytes each).
_TEXT_BYTES = 4 * MAX_MESSAGE


def clean_message(text: str) -> str:
    """``text`` on one line, without control characters, cut to ``MAX_MESSAGE`` characters."""
    # split/join also folds the runs of spaces that removed line breaks leave behind.
    return " ".join(_CONTROL.sub(" ", text[: 4 * MAX_MESSAGE]).split())[:MAX_MESSAGE].rstrip()


def error_message(payload: bytes) -> str:
    """The message of an error body (OpenAI or Anthropic shape), else its text, capped."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        obj = None
    message = _message_of(obj)
    if message is None:
        message = payload[:_TEXT_BYTES].decode("utf-8", errors="ignore")
    return clean_message(message)


def _message_of(obj: Any) -> str | None:
    """``error.message`` (OpenAI, Anthropic), a bare ``error`` string, or ``message``."""
    if not isinstance(obj, dict):
        return None
    error = obj.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    message = obj.get("message")
    return message if isinstance(message, str) else None
