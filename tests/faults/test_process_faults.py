"""Processes dying or freezing: a replica SIGKILLed mid-stream, a healthd leader SIGKILLed,
a healthd leader paused past its lease and then resumed (its stale writes are fenced off)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from router.state.health import ProbeWrite
from tests.faults.support import KEYS, Healthd, fields, in_flight, leases, start
from tests.helpers import Cluster, Mock, auth, wait_until, write_config, write_with_epoch

SLACK_S = 2.0
"""Margin on timing deadlines for a loaded 2-core CI machine; measured figures are printed."""
TOKENS = 20
CHUNK_MS = 200
"""Streams of 20 tokens, one every 200 ms: about 4 s each."""
FAST = {"interval_s": 0.3, "timeout_s": 2.0, "rise": 1, "fall": 1}
"""Probes every 0.3 s; one probe flips the state, so a single stale write would show (a
generous timeout: a slow probe on a busy machine must not pass for one)."""
ROUTES = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
LEASE_S = 1.0


class StreamClient:
    """One streamed chat completion read in a thread, recording what arrived."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.first = threading.Event()
        self.tokens = 0
        self.done = False
        self.errors: list[str] = []
        self.failure = ""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        try:
            with (
                httpx.Client(headers=auth(), timeout=30) as c,
                c.stream("POST", f"{self.url}/v1/chat/completions", json=body) as resp,
            ):
                for line in resp.iter_lines():
                    self._line(line)
        except httpx.HTTPError as exc:  # the replica may be killed under us: that is the test
            self.failure = repr(exc)

    def _line(self, line: str) -> None:
        if not line.startswith("data: "):
            return
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if "error" in event:
            self.errors.append(str(event["error"]))
            return
        if any(c["delta"].get("content") for c in event["choices"]):
            self.tokens += 1
            self.first.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"stream on {self.url} still running"


@pytest.mark.slow
def test_replica_sigkilled_mid_stream(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    mock = Mock("a", "--chunk-interval-ms", str(CHUNK_MS), "--completion-tokens", str(TOKENS))
    gw = start(cluster, tmp_path, redis_url, [mock], ROUTES, replicas=2, lease_ttl_s=2)
    r = redis.Redis(port=redis_port, decode_responses=True)
    (victim, url_a), (_, url_b) = gw.replicas
    on_a = [StreamClient(url_a) for _ in range(3)]
    on_b = [StreamClient(url_b) for _ in range(3)]
    for s in on_a + on_b:
        assert s.first.wait(10), "a stream never started"
    assert in_flight(r, "a") == 6

    victim.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: in_flight(r, "a") == 3, 2 + SLACK_S, "the killed replica's leases to go")
    expired_after = time.monotonic() - killed_at
    print(f"\nleases of the SIGKILLed replica gone after {expired_after:.2f}s (TTL 2s)")

    for s in on_b:  # the survivor's clients never noticed
        s.join(TOKENS * CHUNK_MS / 1000 + 10)
        assert (s.done, s.tokens, s.errors, s.failure) == (True, TOKENS, [], "")
    for s in on_a:
        s.join(10)
        assert not s.done
        assert s.failure  # the connection died with the replica
    wait_until(lambda: mock.stats()["in_flight"] == 0, 5, "the provider to see every end")
    assert mock.stats()["disconnects"] == 3  # the dead replica's upstream connections
    # Expired entries are purged on the next write of the set: one more request does it.
    assert httpx.post(f"{url_b}/v1/chat/completions", headers=auth(), timeout=30,
                      json={"model": "chat", "messages": [{"role": "user", "content": "x"}],
                            "max_tokens": 1}).status_code == 200  # fmt: skip
    wait_until(lambda: leases(r, "a") == 0, 5, "the lease set to be empty")


def healthd_config(tmp: Path, name: str, redis_url: str, mock: Mock) -> Path:
    return write_config(tmp / f"{name}.yaml", redis_url, [mock], ROUTES,
                        healthd={"lease_s": LEASE_S})  # fmt: skip


def epoch_in_redis(r: redis.Redis) -> int:
    return int(r.get(KEYS.epoch()) or 0)


@pytest.mark.slow
def test_healthd_leader_sigkilled_standby_leads(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    mock = Mock("a", health=FAST)
    cluster.mock("a", mock.port)
    config = healthd_config(tmp_path, "router", redis_url, mock)
    first = Healthd(cluster, "healthd-0", config)
    wait_until(first.leading, 5, "the first daemon to lead")
    second = Healthd(cluster, "healthd-1", config)
    assert not second.leading()
    r = redis.Redis(port=redis_port, decode_responses=True)
    old = epoch_in_redis(r)

    first.proc.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(second.leading, 2 * LEASE_S + SLACK_S, "the standby to lead")
    took = time.monotonic() - killed_at
    print(f"\nhealthd takeover after SIGKILL: {took:.2f}s (lease {LEASE_S}s)")
    assert epoch_in_redis(r) == second.epoch() == old + 1
    # the new leader probes: the provider's probe time moves on
    seen = int(fields(r, "a")["h_at"])
    wait_until(lambda: int(fields(r, "a")["h_at"]) > seen, 5, "the new leader to probe")


@pytest.mark.slow
def test_paused_healthd_leader_is_fenced_off_when_it_resumes(
    cluster: Cluster, tmp_path: Path, redis_url: str, redis_port: int
) -> None:
    # Two views of provider a: the old leader probes a port where nothing listens (a is
    # down for it), the new one probes the live mock (a is up). Whatever the old leader
    # writes after it resumes would flip a to down (fall: 1), and be seen.
    live = Mock("a", health=FAST)
    cluster.mock("a", live.port)
    dead = Mock("a", alias_of=Mock("nothing-listens"), health=FAST)
    old = Healthd(cluster, "healthd-old", healthd_config(tmp_path, "old", redis_url, dead))
    r = redis.Redis(port=redis_port, decode_responses=True)
    wait_until(old.leading, 5, "the old daemon to lead")
    wait_until(lambda: fields(r, "a").get("health") == "down", 5, "a to be down (old view)")
    live_config = healthd_config(tmp_path, "live", redis_url, live)
    new = Healthd(cluster, "healthd-new", live_config)
    assert not new.leading()
    old_epoch = old.epoch()
    assert epoch_in_redis(r) == old_epoch

    old.proc.kill(signal.SIGSTOP)
    try:
        paused_at = time.monotonic()
        wait_until(new.leading, 2 * LEASE_S + SLACK_S, "the standby to lead")
        took = time.monotonic() - paused_at
        print(f"\nhealthd takeover after SIGSTOP: {took:.2f}s (lease {LEASE_S}s)")
        new_epoch = new.epoch()
        assert new_epoch == epoch_in_redis(r) > old_epoch
        wait_until(lambda: fields(r, "a").get("health") == "up", 5, "a to be up (new view)")
        sub = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        sub.subscribe(KEYS.health_channel())
    finally:
        old.proc.kill(signal.SIGCONT)
    resumed_at = time.monotonic()

    # it notices at once: its next lease tick, or its first probe write being refused
    wait_until(lambda: old.healthz() is not None and not old.leading(), 2 * LEASE_S + SLACK_S,
               "the resumed daemon to stand by")  # fmt: skip
    print(f"resumed leader stood by after {time.monotonic() - resumed_at:.2f}s")
    wait_until(lambda: old.epoch() == new_epoch, 2 * LEASE_S, "it to learn the new epoch")
    # several probe intervals more: the old daemon must not have written anything
    seen = int(fields(r, "a")["h_at"])
    wait_until(lambda: int(fields(r, "a")["h_at"]) > seen + 1000, 5, "a second of probes")
    events = []
    while (msg := sub.get_message(timeout=0.1)) is not None:
        events.append(json.loads(msg["data"]))
    sub.close()
    assert [e for e in events if e.get("provider") == "a"] == []  # no flip, not even briefly
    now = fields(r, "a")
    assert (now["health"], now["h_error"]) == ("up", "")
    assert epoch_in_redis(r) == new_epoch  # the epoch only moved forward
    assert new.leading()
    fenced = [
        line for line in old.logged()
        if line["msg"] == "standing by" and "fenced" in str(line.get("reason", ""))
    ]  # fmt: skip
    print("the old leader was " + ("fenced off by a refused write" if fenced
          else "told by its lease tick"))  # fmt: skip
    # and the fence itself: a write with the old epoch is refused outright
    stale = asyncio.run(write_with_epoch(live_config, old_epoch))
    assert stale == ProbeWrite(recorded=False, state="", version=0)
    assert fields(r, "a")["h_error"] != "stale"
