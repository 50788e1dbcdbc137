"""Sentinel and Cluster over TLS only, with a CA made here and ACL users (``default`` off):
the data nodes', and the sentinels' own. Two replicas serve the openai SDK through
``rediss+sentinel://user:pass@.../primary?ssl_ca_certs=...&ssl_certfile=...&ssl_keyfile=...
&sentinel_username=...&sentinel_password=...`` (every server of that set wants a client
certificate) and ``rediss+cluster://user:pass@...?ssl_ca_certs=...``: round robin
global, an RPM limit exact, pub/sub heard (a drain; healthd's probes), the sentinels' primary
followed across a failover; routerctl works; no password shows up in any output. And
``sentinel_ssl=false``: sentinels answering on a plain port with a password (``requirepass``)
in front of TLS data nodes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from router.config import load_config
from router.errors import StoreError
from router.state.health import HealthStore
from router.state.store import Store, _SentinelSSLConnection
from tests.helpers import (
    ENV,
    ROOT,
    Cluster,
    Mock,
    async_wait_until,
    ctl,
    drain_through_the_store,
    drained,
    wait_until,
    write_config,
)
from tests.tls import Certs, make_certificates
from tests.topologies import (
    SENTINEL_PASSWORD,
    TLS_PASSWORD,
    exact_rpm,
    global_round_robin,
    healthd_leads_and_publishes,
    redis_cluster,
    sentinel_set,
    start_healthd,
    state,
    status,
    topology_gateway,
)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    d = tmp_path / "pki"
    d.mkdir()
    return make_certificates(d)


def check_config(config: Path) -> str:
    """``routerctl check-config``'s output (it prints the store's URL, masked)."""
    done = subprocess.run(
        [sys.executable, "-m", "router.ctl", "check-config", str(config)],
        capture_output=True, text=True, cwd=ROOT, env={**ENV, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def assert_no_secret(texts: list[str]) -> None:
    for text in texts:
        assert TLS_PASSWORD not in text
        assert SENTINEL_PASSWORD not in text


def test_a_tls_sentinel_set_with_acl_users(cluster: Cluster, tmp_path: Path, certs: Certs) -> None:
    started = time.monotonic()
    d = tmp_path / "sentinel"
    d.mkdir()
    certs = replace(certs, mutual=True)  # every server wants the client's certificate too
    with sentinel_set(d, certs) as sentinels:
        assert "&ssl_certfile=" in sentinels.url
        # the sentinels want TLS, their own user and a client certificate: each is needed
        full = sentinels.sentinels.kwargs()
        no_user = {**full, "username": None, "password": None}
        no_cert = {**full, "ssl_certfile": None, "ssl_keyfile": None}
        no_tls = {"username": full["username"], "password": full["password"]}
        for kwargs in (full, no_user, no_cert, no_tls):
            with redis.Redis(
                port=sentinels.sentinel_ports[0], socket_timeout=1, retry=Retry(NoBackoff(), 0),
                **kwargs,
            ) as r:  # fmt: skip
                if kwargs is full:
                    assert r.execute_command("SENTINEL", "MASTERS")
                    continue
                with pytest.raises(redis.RedisError):
                    r.execute_command("SENTINEL", "MASTERS")
        set_up = time.monotonic()
        gw = topology_gateway(cluster, tmp_path, sentinels.url)
        gw_up = time.monotonic()
        counts = global_round_robin(gw)
        before = exact_rpm(gw, "limited", "r1")

        # pub/sub over TLS: a drain written by another store reaches both replicas
        asyncio.run(drain_through_the_store(gw.config, "c"))
        wait_until(lambda: all(drained(u, "c") for u in gw.urls), 10, "both to hear the drain")

        # the primary killed: the sentinels (over TLS, with their user) promote the replica
        killed = time.monotonic()
        sentinels.primary.kill()
        new = ("127.0.0.1", sentinels.replica_port)
        wait_until(lambda: sentinels.primary_addresses() == {new}, 30, "the failover")
        wait_until(lambda: all(status(u) == "ready" for u in gw.urls), 30, "both ready")
        back = time.monotonic()
        after = exact_rpm(gw, "limited-after", "r2")

        # the scripts' pooled connections pack with hiredis, as over rediss:// (not redis-py's
        # own SentinelManagedSSLConnection)
        store = Store.from_config(load_config(gw.config, dict(ENV)))
        used = store.client.connection_pool.connection_class
        assert used is _SentinelSSLConnection, used.__name__
        assert store.subscriber_pool is not None
        assert store.subscriber_pool().connection_class is _SentinelSSLConnection

        shown = check_config(gw.config)
        assert "sentinel_password=***" in shown, shown
        assert len(state(gw)["providers"]) == 5  # routerctl through the TLS sentinels
        assert_no_secret([shown, ctl(gw, "state"), *(p.output() for p in cluster.procs)])
        assert_no_secret([p.output() for p in sentinels.procs])
    print(
        f"\ntls sentinel: round robin {counts}; rpm before {before} after {after};"
        f" set up {set_up - started:.1f} s; gateway up {gw_up - set_up:.1f} s;"
        f" kill to both ready {back - killed:.1f} s;"
        f" wall {time.monotonic() - started:.1f} s"
    )


def test_a_tls_cluster_with_an_acl_user(cluster: Cluster, tmp_path: Path, certs: Certs) -> None:
    started = time.monotonic()
    d = tmp_path / "cluster"
    d.mkdir()
    with redis_cluster(d, certs) as nodes:
        set_up = time.monotonic()
        gw = topology_gateway(cluster, tmp_path, nodes.url)
        gw_up = time.monotonic()
        counts = global_round_robin(gw)  # the scripts, on the slot's node, over TLS
        rpm = exact_rpm(gw, "limited", "r1")

        # pub/sub over TLS on any node: healthd's probes, and a drain, reach both replicas
        start_healthd(cluster, gw.config)
        healthd_leads_and_publishes(gw)
        asyncio.run(drain_through_the_store(gw.config, "c"))
        wait_until(lambda: all(drained(u, "c") for u in gw.urls), 10, "both to hear the drain")

        shown = check_config(gw.config)
        assert "rediss+cluster://***@127.0.0.1:" in shown, shown
        assert_no_secret([shown, ctl(gw, "state"), *(p.output() for p in cluster.procs)])
        assert_no_secret([p.output() for p in nodes.nodes.values()])
    print(
        f"\ntls cluster: round robin {counts}; rpm {rpm}; set up {set_up - started:.1f} s;"
        f" gateway up {gw_up - set_up:.1f} s;"
        f" wall {time.monotonic() - started:.1f} s"
    )


async def test_plain_sentinels_with_a_password_in_front_of_tls_data_nodes(
    tmp_path: Path, certs: Certs
) -> None:
    """``sentinel_ssl=false``: the sentinels answer on a plain port and want a password
    (``requirepass``, no user); the data nodes speak TLS only. The store's scripts and its
    subscription follow the primary across a failover."""
    d = tmp_path / "sentinel"
    d.mkdir()
    with sentinel_set(d, certs, plain_sentinels=True) as sentinels:
        assert "sentinel_ssl=false" in sentinels.url
        routes = [{"model": "chat", "targets": [{"provider": "a", "model": "m"}]}]
        path = write_config(tmp_path / "r.yaml", sentinels.url, [Mock("a")], routes)
        store = Store.from_config(load_config(path, dict(ENV)))
        await store.start(warm=1)
        try:
            await HealthStore(store).set_drain("a", True)  # a script, over TLS
            sub = await store.subscribe("chan")
            await store.client.publish("chan", b"before")
            assert b"before" in [await sub.next(within=1) for _ in range(2)]  # after the ack
            await sub.close()

            sentinels.primary.kill()
            new = ("127.0.0.1", sentinels.replica_port)
            await async_wait_until(
                lambda: asyncio.to_thread(lambda: sentinels.primary_addresses() == {new}),
                30, "the failover",
            )  # fmt: skip

            async def answers() -> bool:
                try:
                    await HealthStore(store).set_drain("a", False)
                except StoreError:
                    return False
                return True

            await async_wait_until(answers, 10, "the store on the new primary")
            sub = await store.subscribe("chan")
            await store.client.publish("chan", b"after")
            assert b"after" in [await sub.next(within=1) for _ in range(2)]
            await sub.close()
        finally:
            await store.close()
        assert_no_secret([p.output() for p in sentinels.procs])
