"""Locust users of the gateway: chat, streamed chat (timed to headers, first token and end),
embeddings.

Run it headless against a gateway (``routerctl loadtest`` runs exactly this, and can start a
local cluster first)::

    ROUTER_CLIENT_KEY=<client key> locust --headless -f loadtest/locustfile.py \\
        --host http://127.0.0.1:8080 --users 20 --spawn-rate 5 --run-time 60s \\
        --csv loadtest/results/locust --html loadtest/results/locust.html

``--host`` is the gateway's root URL (without ``/v1``). The environment shapes the traffic:

| variable | default | what |
|---|---|---|
| ``ROUTER_CLIENT_KEY`` | required | the bearer key the users send |
| ``LOCUST_CHAT_WEIGHT`` | 6 | weight of ``ChatUser`` (whole answers); 0 leaves it out |
| ``LOCUST_STREAM_WEIGHT`` | 3 | weight of ``StreamUser`` (``stream: true``) |
| ``LOCUST_EMBED_WEIGHT`` | 1 | weight of ``EmbedUser`` |
| ``LOCUST_CHAT_MODEL`` | ``chat-default`` | the route chat and stream users ask for |
| ``LOCUST_EMBED_MODEL`` | ``embed-default`` | the route embedding users ask for |
| ``LOCUST_SEED`` | random | seed of the prompt generator |

Prompts are as uneven as real ones: a lognormal number of words (median 40, most between
10 and 160), and 2 % long documents of 1,500 to 3,000 words; ``max_tokens`` varies too.

What the statistics hold:

- ``POST chat``, ``POST embeddings``: every request, to its whole answer; any answer but 200
  fails, except 429;
- ``POST chat stream (to headers)``: every streamed request, timed to its response headers
  (the time to first byte: the stream itself is still to come); failures are counted here;
- ``TTFT chat stream (to first token)``: from the request to its first content token;
- ``STREAM chat stream (to [DONE])``: from the request to the end of the whole stream, for
  each stream that ended well;
- ``SATURATED <name>``: the 429s, counted on their own and not as failures: the gateway had
  no room (every provider at its limits) and said so, which is its job.

All in ms. A stream that carries an error event or ends without ``[DONE]`` fails.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any

from locust import FastHttpUser, HttpUser, between, task
from locust.env import Environment

CHAT_PATH = "/v1/chat/completions"
EMBED_PATH = "/v1/embeddings"
CHAT = "chat"
STREAM = "chat stream"
STREAM_HEADERS = f"{STREAM} (to headers)"
STREAM_FIRST_TOKEN = f"{STREAM} (to first token)"
STREAM_DONE = f"{STREAM} (to [DONE])"
EMBED = "embeddings"
CHAT_MODEL = os.environ.get("LOCUST_CHAT_MODEL", "chat-default")
EMBED_MODEL = os.environ.get("LOCUST_EMBED_MODEL", "embed-default")
HEADERS = {"Authorization": f"Bearer {os.environ.get('ROUTER_CLIENT_KEY', '')}"}
MEDIAN_WORDS = 40
LONG_SHARE = 0.02
MAX_TOKENS = (32, 64, 128, 256)
TEXT = (
    "the gateway routes each request to a provider with room while replicas share their "
    "state in redis so limits hold across the cluster and streams relay tokens as they come "
    "latency cost headroom weight rotation lease window budget answer question context"
)
WORDS = tuple(TEXT.split(" "))
RNG = random.Random(os.environ.get("LOCUST_SEED"))


def env_weight(variable: str, default: int) -> int:
    """A user class's weight from the environment (0 leaves the class out)."""
    return max(0, int(os.environ.get(variable, default)))


def prompt_words(median: int = MEDIAN_WORDS) -> int:
    """Words in one prompt: lognormal around ``median``, sometimes a long document."""
    if RNG.random() < LONG_SHARE:
        return RNG.randint(1500, 3000)
    return max(1, min(1200, round(RNG.lognormvariate(math.log(median), 0.7))))


def text(words: int) -> str:
    """``words`` words of filler text."""
    return " ".join(RNG.choices(WORDS, k=words))


def chat_body(stream: bool) -> dict[str, Any]:
    """A chat completions request with a prompt of realistic, uneven size."""
    body: dict[str, Any] = {
        "model": CHAT_MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text(prompt_words())},
        ],
        "max_tokens": RNG.choice(MAX_TOKENS),
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def embed_body() -> dict[str, Any]:
    """An embeddings request: one to eight inputs of uneven size."""
    inputs = [text(prompt_words(median=20)) for _ in range(RNG.randint(1, 8))]
    return {"model": EMBED_MODEL, "input": inputs}


def fire(env: Environment, kind: str, name: str, started: float, length: int = 0) -> None:
    """Record a measurement of our own (``TTFT``, ``STREAM``, ``SATURATED``) in Locust's
    statistics: the time from ``started`` to now."""
    env.events.request.fire(
        request_type=kind, name=name, response_time=(time.perf_counter() - started) * 1000,
        response_length=length, exception=None, context={},
    )  # fmt: skip


def settle(env: Environment, resp: Any, name: str, started: float) -> bool:
    """Judge a non-200 answer: a 429 is saturation (no failure); True when it was a 200."""
    if resp.status_code == 200:
        return True
    if resp.status_code == 429:
        resp.success()
        fire(env, "SATURATED", name, started)
    else:
        resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
    return False


def stream_error(lines: Any, env: Environment, started: float) -> str | None:
    """Read an SSE answer to its end, reporting the first token's time and, once ``[DONE]``
    comes, the whole stream's; the error, if any."""
    first = True
    for raw in lines:
        line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            fire(env, "STREAM", STREAM_DONE, started)
            return None
        event = json.loads(data)
        if "error" in event:
            return f"error event: {str(event['error'])[:200]}"
        choices = event.get("choices") or [{}]
        if first and choices[0].get("delta", {}).get("content"):
            fire(env, "TTFT", STREAM_FIRST_TOKEN, started)
            first = False
    return "the stream ended without [DONE]"


class ChatUser(FastHttpUser):
    """Asks for whole chat answers (``stream: false``)."""

    weight = env_weight("LOCUST_CHAT_WEIGHT", 6)
    wait_time = between(0.05, 0.5)

    @task
    def chat(self) -> None:
        """One chat completion."""
        body = chat_body(False)
        started = time.perf_counter()
        with self.client.request(
            "POST", CHAT_PATH, json=body, headers=HEADERS, name=CHAT,
            catch_response=True,
        ) as resp:  # fmt: skip
            if settle(self.environment, resp, CHAT, started) and not resp.json().get("choices"):
                resp.failure("no choices in the answer")


class StreamUser(HttpUser):
    """Asks for streamed chat answers; times each to its headers, first token and end.

    ``HttpUser`` (requests), because its streamed body yields each SSE chunk as it arrives.
    """

    weight = env_weight("LOCUST_STREAM_WEIGHT", 3)
    wait_time = between(0.05, 0.5)

    @task
    def stream(self) -> None:
        """One streamed chat completion, read to its end."""
        body = chat_body(True)
        started = time.perf_counter()
        with self.client.post(
            CHAT_PATH, json=body, headers=HEADERS, name=STREAM_HEADERS, stream=True,
            catch_response=True,
        ) as resp:  # fmt: skip
            # stream=True: Locust's own entry is timed to the headers, before the body
            if not settle(self.environment, resp, STREAM, started):
                return
            error = stream_error(resp.iter_lines(chunk_size=None), self.environment, started)
            if error is not None:
                resp.failure(error)


class EmbedUser(FastHttpUser):
    """Asks for embeddings of a few texts at a time."""

    weight = env_weight("LOCUST_EMBED_WEIGHT", 1)
    wait_time = between(0.05, 0.5)

    @task
    def embed(self) -> None:
        """One embeddings request."""
        body = embed_body()
        started = time.perf_counter()
        with self.client.request(
            "POST", EMBED_PATH, json=body, headers=HEADERS, name=EMBED, catch_response=True
        ) as resp:
            ok = settle(self.environment, resp, EMBED, started)
            if ok and len(resp.json().get("data", [])) != len(body["input"]):
                resp.failure("not one embedding per input")
