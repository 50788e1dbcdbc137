"""The scripts' shared connection with a resolver (Sentinel, Cluster): it asks where to
connect at every new connection; a READONLY, NOREPLICAS or CLUSTERDOWN reply makes it ask
again, a MOVED one too and the call is sent again there; an ASK sends it to the named node
after ASKING; a TRYAGAIN sends it again after a pause; ``retire`` makes the next call ask
again without failing the calls already sent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import hiredis
import pytest
from redis import exceptions as rx

from router.state.muxredis import MuxRedis, NoReplicasError


async def serve(reply: Callable[[bytes], bytes]) -> tuple[asyncio.Server, int]:
    """A fake node answering each read (one command each here) with ``reply(command)``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(reply(data))
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def stale_then_redis(
    answers: list[tuple[str, int]],
) -> tuple[Callable[[], Awaitable[tuple[str, int]]], list[tuple[str, int]]]:
    """A resolver answering ``answers[0]`` first, then ``answers[1]``; and what it answered."""
    asked: list[tuple[str, int]] = []

    async def resolve() -> tuple[str, int]:
        asked.append(answers[min(len(asked), 1)])
        return asked[-1]

    return resolve, asked


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"-READONLY You can't write against a read only replica.\r\n", rx.ReadOnlyError),
        (b"-NOREPLICAS Not enough good replicas to write.\r\n", NoReplicasError),
        (b"-CLUSTERDOWN The cluster is down\r\n", rx.ClusterDownError),
    ],
)
async def test_a_node_that_no_longer_serves_the_keys_is_left_for_the_resolvers_answer(
    redis_port: int, redis_url: str, reply: bytes, error: type[Exception]
) -> None:
    stale, stale_port = await serve(lambda _: reply)
    answers = [("127.0.0.1", stale_port), ("127.0.0.1", redis_port)]
    resolve, asked = stale_then_redis(answers)
    mux = MuxRedis("redis://resolved/0", timeout=2.0, resolver=resolve)
    with pytest.raises(error):
        await mux.execute("INCR", "{t}:moved")
    assert await mux.execute("INCR", "{t}:moved") == 1  # connected again, where it was told
    assert await mux.execute("INCR", "{t}:moved") == 2  # and stays there
    assert asked == answers
    await mux.close()
    stale.close()
    await stale.wait_closed()


async def test_a_resolver_that_cannot_answer_is_a_connection_error() -> None:
    async def nobody() -> tuple[str, int]:
        raise rx.ConnectionError("No master found for 'main'")

    mux = MuxRedis("redis://resolved/0", timeout=1.0, resolver=nobody)
    with pytest.raises(rx.ConnectionError, match="No master found"):
        await mux.execute("PING")


async def test_a_retired_connection_answers_what_was_sent_and_the_next_call_asks_again(
    redis_port: int,
) -> None:
    asked = 0

    async def resolve() -> tuple[str, int]:
        nonlocal asked
        asked += 1
        return "127.0.0.1", redis_port

    mux = MuxRedis("redis://resolved/0", timeout=5.0, resolver=resolve)
    name = await mux.execute("CLIENT", "ID")
    # a call that holds the connection, sent before the primary "moved"
    blocked = asyncio.ensure_future(mux.execute("BLPOP", "{t}:never", "0.5"))
    await asyncio.sleep(0)  # sent in this loop turn
    mux.retire()
    # the next call goes on a new connection (asked again) and does not wait behind it
    assert await mux.execute("CLIENT", "ID") != name
    assert not blocked.done()
    assert asked == 2
    assert await blocked is None  # the retired connection still answered what it was sent
    await mux.close()


async def test_a_moved_call_is_sent_again_where_the_resolver_says_now(
    redis_port: int, redis_url: str
) -> None:
    stale, stale_port = await serve(lambda _: b"-MOVED 866 127.0.0.1:7001\r\n")
    answers = [("127.0.0.1", stale_port), ("127.0.0.1", redis_port)]
    resolve, asked = stale_then_redis(answers)
    mux = MuxRedis("redis://resolved/0", timeout=2.0, resolver=resolve)
    assert await mux.execute("INCR", "{t}:moved-again") == 1  # followed within the call
    assert await mux.execute("INCR", "{t}:moved-again") == 2
    assert asked == answers
    await mux.close()
    stale.close()
    await stale.wait_closed()


async def test_an_ask_sends_asking_then_the_call_to_the_named_node(
    redis_port: int, redis_url: str
) -> None:
    seen: list[bytes] = []

    def target_reply(data: bytes) -> bytes:
        seen.append(data)
        return b"+OK\r\n:7\r\n"  # ASKING's, then the call's

    migrating, source_port = await serve(lambda _: b"-ASK 866 127.0.0.1:%d\r\n" % target_port)
    target, target_port = await serve(target_reply)

    async def resolve() -> tuple[str, int]:
        return "127.0.0.1", source_port

    mux = MuxRedis("redis://resolved/0", timeout=2.0, resolver=resolve)
    assert await mux.execute("INCR", "{t}:asked") == 7
    asked_then_call = hiredis.pack_command(("ASKING",)) + hiredis.pack_command(
        ("INCR", "{t}:asked")
    )
    assert seen == [asked_then_call]
    await mux.close()
    migrating.close()
    await migrating.wait_closed()
    target.close()
    await target.wait_closed()


async def test_tryagain_is_sent_again_until_the_keys_are_together_or_time_is_up() -> None:
    replies = [b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"] * 3
    node, port = await serve(lambda _: replies.pop() if replies else b":1\r\n")

    async def resolve() -> tuple[str, int]:
        return "127.0.0.1", port

    mux = MuxRedis("redis://resolved/0", timeout=1.0, resolver=resolve)
    assert await mux.execute("EVAL", "return 1", 2, "{t}:a", "{t}:b") == 1
    replies += [b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"] * 1000
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(rx.TryAgainError):
        await mux.execute("EVAL", "return 1", 2, "{t}:a", "{t}:b")
    assert 0.9 <= loop.time() - started <= 1.5  # within the call's timeout, about
    await mux.close()
    node.close()
    await node.wait_closed()
