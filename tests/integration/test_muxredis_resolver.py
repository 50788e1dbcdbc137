"""The scripts' shared connection with a resolver (Sentinel, Cluster): it asks where to
connect at every new connection, and a READONLY, MOVED, NOREPLICAS or CLUSTERDOWN reply makes it ask
again; ``retire`` makes it ask again without failing the calls already sent."""

from __future__ import annotations

import asyncio

import pytest
from redis import exceptions as rx

from router.state.muxredis import MuxRedis, NoReplicasError


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"-READONLY You can't write against a read only replica.\r\n", rx.ReadOnlyError),
        (b"-MOVED 866 127.0.0.1:7001\r\n", rx.MovedError),
        (b"-ASK 866 127.0.0.1:7001\r\n", rx.MovedError),
        (b"-NOREPLICAS Not enough good replicas to write.\r\n", NoReplicasError),
        (b"-CLUSTERDOWN The cluster is down\r\n", rx.ClusterDownError),
    ],
)
async def test_a_node_that_no_longer_serves_the_keys_is_left_for_the_resolvers_answer(
    redis_port: int, redis_url: str, reply: bytes, error: type[Exception]
) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            writer.write(reply)  # one command per read in this test: one reply each
        writer.close()

    stale = await asyncio.start_server(refuse, "127.0.0.1", 0)
    stale_port = stale.sockets[0].getsockname()[1]
    answers = [("127.0.0.1", stale_port), ("127.0.0.1", redis_port)]
    asked: list[tuple[str, int]] = []

    async def resolve() -> tuple[str, int]:
        asked.append(answers[min(len(asked), 1)])
        return asked[-1]

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
