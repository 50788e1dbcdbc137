"""The scripts' shared pipelined connection (router/state/muxredis.py) against a real Redis."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import redis
from redis import exceptions as rx

from router.state.muxredis import MuxRedis

SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
BUSY = """
local t0 = redis.call('TIME')
repeat local t = redis.call('TIME')
until (t[1] - t0[1]) * 1e6 + (t[2] - t0[2]) > 600000
return 1
"""
"""Keeps Redis busy for 0.6 s (DEBUG SLEEP is disabled by default since Redis 7)."""


async def test_concurrent_calls_get_their_own_replies_in_order(redis_url: str) -> None:
    mux = MuxRedis(redis_url, timeout=2.0)
    replies = await asyncio.gather(*(mux.execute("INCR", "{t}:n") for _ in range(2000)))
    assert replies == list(range(1, 2001))  # one connection, written and answered in order
    assert await mux.execute("SET", "{t}:s", "x") == b"OK"
    assert await mux.execute("GET", "{t}:s") == b"x"
    with pytest.raises(rx.ResponseError, match="WRONGTYPE"):
        await mux.execute("LPUSH", "{t}:s", 1)
    assert await mux.execute("GET", "{t}:s") == b"x"  # an error reply leaves the pipe in step
    await mux.close()


async def test_a_script_redis_lacks_is_sent_in_full_once(redis_url: str) -> None:
    mux = MuxRedis(redis_url, timeout=2.0)
    await mux.execute("SCRIPT", "FLUSH")
    assert await mux.evalsha(SHA, SCRIPT, ["{t}:c"], [5]) == 5  # NOSCRIPT, then EVAL
    assert await mux.execute("SCRIPT", "EXISTS", SHA) == [1]  # EVAL cached it
    assert await mux.evalsha(SHA, SCRIPT, ["{t}:c"], [5]) == 10
    await mux.close()


async def test_a_stalled_redis_times_out_every_queued_call_then_recovers(redis_url: str) -> None:
    mux = MuxRedis(redis_url, timeout=0.2)
    other = redis.Redis.from_url(redis_url)
    assert await mux.execute("PING") == b"PONG"
    sleeper = asyncio.create_task(asyncio.to_thread(other.eval, BUSY, 0))
    await asyncio.sleep(0.05)  # the sleep command is running in Redis
    calls = [asyncio.ensure_future(mux.execute("INCR", "{t}:late")) for _ in range(5)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, rx.TimeoutError) for r in results), results
    await sleeper
    assert await mux.execute("PING") == b"PONG"  # a new connection, opened on demand
    other.close()
    await mux.close()


async def test_a_lost_connection_fails_its_calls_and_the_next_call_reconnects(
    redis_url: str,
) -> None:
    mux = MuxRedis(redis_url, timeout=2.0)
    other = redis.Redis.from_url(redis_url)
    await mux.execute("CLIENT", "SETNAME", "mux-under-test")
    for c in other.client_list():
        if c.get("name") == "mux-under-test":
            other.client_kill_filter(_id=c["id"])
    error = None
    for _ in range(50):  # the close may take a moment to arrive
        try:
            await mux.execute("PING")
        except rx.ConnectionError as exc:
            error = exc
            break
        await asyncio.sleep(0.01)
    assert error is not None
    assert await mux.execute("PING") == b"PONG"
    other.close()
    await mux.close()


async def test_nothing_listening_is_a_connection_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mux = MuxRedis(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    with pytest.raises(rx.ConnectionError):
        await mux.execute("PING")


async def test_user_password_and_database_from_the_url(redis_port: int, redis_url: str) -> None:
    admin = redis.Redis(port=redis_port)
    admin.acl_setuser("mux-test", enabled=True, passwords=["+s3cret-pass"], keys=["*"],
                      commands=["+@all"])  # fmt: skip
    try:
        mux = MuxRedis(f"redis://mux-test:s3cret-pass@127.0.0.1:{redis_port}/3", timeout=2.0)
        assert await mux.execute("SET", "k", "v") == b"OK"
        assert redis.Redis(port=redis_port, db=3).get("k") == b"v"
        await mux.close()
        wrong = MuxRedis(f"redis://mux-test:wrong@127.0.0.1:{redis_port}/0", timeout=2.0)
        with pytest.raises(rx.AuthenticationError):
            await wrong.execute("PING")
    finally:
        admin.acl_deluser("mux-test")
        admin.close()
