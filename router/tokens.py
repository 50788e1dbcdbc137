"""Token estimates used to reserve TPM before a provider has answered.

The rule (documented in the README): a prompt costs ``ceil(characters / 4)`` plus 4 tokens
per message and 3 for the reply's priming; tools and other structured content count by
the length of their JSON. Providers charge TPM when they admit a request, typically
``max(max_tokens, prompt)`` (OpenAI's documented rule), so that is what ``reserved``
accounting reserves; ``actual`` accounting reserves ``prompt + max_tokens`` and is corrected
to the reported usage when the request ends, so the reservation is never below the truth.
"""

from __future__ import annotations

from typing import Any

import orjson

from router.config import TpmAccounting

PER_MESSAGE = 4
PRIMING = 3


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"])
            else:
                total += len(orjson.dumps(part))
        return total
    if content is None:
        return 0
    return len(orjson.dumps(content))


def _ceil4(chars: int) -> int:
    return (chars + 3) // 4


def prompt_tokens(body: dict[str, Any]) -> int:
    """Estimate the prompt tokens of a chat-completions body."""
    messages = body.get("messages") or []
    chars = 0
    for m in messages:
        if isinstance(m, dict):
            chars += _chars(m.get("content"))
            if "tool_calls" in m:
                chars += _chars(m["tool_calls"])
    if body.get("tools"):
        chars += _chars(body["tools"])
    return _ceil4(chars) + PER_MESSAGE * len(messages) + PRIMING


def embedding_tokens(body: dict[str, Any]) -> int:
    """Estimate the tokens of an embeddings body."""
    value = body.get("input")
    if isinstance(value, str):
        return _ceil4(len(value)) + 1
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return len(value)
        return sum(
            len(v) if isinstance(v, list) else _ceil4(len(v)) + 1
            for v in value
            if isinstance(v, str | list)
        )
    return 1


def max_output(body: dict[str, Any], default: int) -> int:
    """The completion budget the request allows (``default`` when it names none)."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def reservation(prompt: int, max_out: int, accounting: TpmAccounting) -> int:
    """Tokens to reserve in the TPM window when the request is admitted."""
    if accounting is TpmAccounting.ACTUAL:
        return prompt + max_out
    return max(max_out, prompt)
