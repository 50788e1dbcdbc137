"""A request's affinity key: what a route's ``affinity.key`` names, read from the request.

- ``header:<name>``: that header's value (the first, if it repeats);
- ``body:<a>.<b>``: that body field, when it is a string or a number;
- ``prefix``: a hash of what providers' prompt caches key on: the system prompt, the tools
  and the first ``prefix_messages`` messages, in each API's own fields (chat: the system and
  developer messages, ``tools``, the first other messages; Messages: ``system``, ``tools``,
  ``messages``; Responses: ``instructions``, ``tools``, the first ``input`` items).
  ``cache_control`` markers are left out of the hash: clients move them from request to
  request (Claude Code marks the latest turn) without changing the prefix they mark.

A request without the key (no such header or field, an empty value) is not pinned. The value
is only ever hashed (``router.state.affinity.affinity_digest``), never stored or logged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from router.config import Affinity
from router.upstream.codecs import CHAT, MESSAGES, RESPONSES

MAX_VALUE_BYTES = 4096
"""A header or body value longer than this is hashed all the same, but cut here first (a key
is an identifier: a longer one is a mistake or an attack, never a reason for more work)."""


def affinity_value(
    affinity: Affinity, api: str, headers: Mapping[bytes, bytes], body: dict[str, Any]
) -> str | None:
    """The request's affinity key under ``affinity``, or ``None`` when it has none; ``api``:
    the inbound API it came in (``router.upstream.codecs``' names)."""
    source = affinity.key
    if source == "prefix":
        return prefix_hash(api, body, affinity.prefix_messages)
    kind, _, name = source.partition(":")
    if kind == "header":
        raw = headers.get(name.encode("ascii"))
        if not raw:
            return None
        return raw[:MAX_VALUE_BYTES].decode("latin-1")
    value: Any = body
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = str(value)[:MAX_VALUE_BYTES]
    return text or None


def prefix_hash(api: str, body: dict[str, Any], messages: int) -> str | None:
    """sha256 of the request's prefix (see the module's docstring); ``None`` when it is empty."""
    if api == CHAT:
        all_messages = body.get("messages")
        if not isinstance(all_messages, list):
            return None
        system = [m for m in all_messages if _role(m) in ("system", "developer")]
        rest = [m for m in all_messages if _role(m) not in ("system", "developer")]
        parts: list[Any] = [system, _tools(body.get("tools")), _marks_off(rest[:messages])]
    elif api == MESSAGES:
        turns = body.get("messages")
        first = _marks_off(turns[:messages]) if isinstance(turns, list) else []
        raw = body.get("system")
        parts = [_blocks(raw) if isinstance(raw, list) else raw, _tools(body.get("tools")), first]
    elif api == RESPONSES:
        items = body.get("input")
        first = [items] if isinstance(items, str) else items if isinstance(items, list) else []
        parts = [body.get("instructions"), _tools(body.get("tools")), first[:messages]]
    else:
        return None
    if not any(parts):
        return None
    try:
        text = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254): not pinned
        return None
    return hashlib.sha256(text).hexdigest()


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _tools(tools: Any) -> Any:
    return _blocks(tools) if isinstance(tools, list) else None


def _blocks(blocks: list[Any]) -> list[Any]:
    """``blocks`` with the ``cache_control`` of each left out."""
    return [
        {k: v for k, v in b.items() if k != "cache_control"} if isinstance(b, dict) else b
        for b in blocks
    ]


def _marks_off(messages: list[Any]) -> list[Any]:
    """``messages`` with the ``cache_control`` of each content block left out."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            m = {**m, "content": _blocks(content)}
        out.append(m)
    return out
