"""Provider adapters, one module per kind: a new kind is one new file plus one line here."""

from __future__ import annotations

from router.upstream.providers._common import api_url
from router.upstream.providers.anthropic import AnthropicAdapter
from router.upstream.providers.base import Adapter
from router.upstream.providers.openai import OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {
    OpenAIAdapter.kind: OpenAIAdapter(),
    AnthropicAdapter.kind: AnthropicAdapter(),
}


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "api_url"]


def adapter_for(kind: str) -> Adapter:
    """The adapter for a provider kind (``Provider.kind``); ``KeyError`` if unknown."""
    return ADAPTERS[str(kind)]
