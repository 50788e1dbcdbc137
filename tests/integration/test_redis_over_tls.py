"""A replica on ``rediss://``: a real redis-server with TLS on loopback, its certificate signed
by a CA made here, that admits an ACL user only (``default`` is off). The scripts and the
health subscription both go over TLS, through the project's own TLS connection class, logged
in as that user, and its password shows up nowhere."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from router.config import load_config
from router.state.keys import Keys
from router.state.store import Store, _SSLConnection
from tests.helpers import (
    ENV,
    ROOT,
    Cluster,
    Mock,
    auth,
    drain_through_the_store,
    drained,
    free_port,
    port_open,
    redis_server_binary,
    start_gateway,
    wait_until,
)
from tests.tls import Certs, acl_args, make_certificates

USER = "router-app"
PASSWORD = "tls-redis-password-5f3a9c"
KEYS = Keys("rc", "default")
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


class TlsRedis:
    def __init__(self, port: int, certs: Certs) -> None:
        self.port = port
        self.certs = certs

    @property
    def url(self) -> str:
        return f"rediss://{USER}:{PASSWORD}@127.0.0.1:{self.port}/0?{self.certs.query()}"

    def client(self, user: str = USER) -> redis.Redis:
        # no retries: a refused login is said at once (redis-py retries it for 5 s)
        return redis.Redis(port=self.port, username=user, password=PASSWORD,
                           decode_responses=True, retry=Retry(NoBackoff(), 0),
                           **self.certs.client_kwargs())  # fmt: skip


@pytest.fixture
def tls_redis(cluster: Cluster, tmp_path: Path) -> TlsRedis:
    """A redis-server that speaks only TLS (no plain port) and admits the ACL user ``USER``
    only; the cluster stops it."""
    certs = make_certificates(tmp_path)
    port = free_port()
    argv = [
        redis_server_binary(), *certs.server_args(port), *acl_args(USER, PASSWORD),
        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
    ]  # fmt: skip
    cluster.start(f"redis-tls-{port}", argv)
    wait_until(lambda: port_open(port), 10, "the TLS redis-server to listen")
    return TlsRedis(port, certs)


def test_a_replica_on_rediss_runs_its_scripts_and_hears_health_events(
    cluster: Cluster, tmp_path: Path, tls_redis: TlsRedis
) -> None:
    routes = [{"model": "chat", "targets": [{"provider": "p", "model": "m"}]}]
    gw = start_gateway(cluster, tmp_path, tls_redis.url, [Mock("p")], routes, replicas=1)

    # the user is the only way in: the default user, even with the password, is refused
    with pytest.raises(redis.AuthenticationError):
        tls_redis.client(user="default").ping()

    # the scripts, over TLS: the request is decided in Redis and counted there
    r = httpx.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT, headers=auth(), timeout=10)
    assert r.status_code == 200, r.text
    direct = tls_redis.client()
    assert direct.hget(KEYS.provider("p"), "rpm") == "1"
    wait_until(lambda: direct.hget(KEYS.provider("p"), "o:ok") == "1", 5, "the release")

    # the health subscription, over TLS: a drain written elsewhere reaches the replica by
    # pub/sub (its periodic re-read, replica.resync_s, is 30 s away)
    assert not drained(gw.urls[0], "p")
    asyncio.run(drain_through_the_store(gw.config, "p"))
    wait_until(lambda: drained(gw.urls[0], "p"), 10, "the replica to hear of the drain")

    # the project's connection class (hiredis packing), not redis-py's plain SSLConnection
    used = Store.from_config(
        load_config(gw.config, dict(ENV))
    ).client.connection_pool.connection_class
    assert used is _SSLConnection, used.__name__

    # the password is in the URL; it must be in no output
    check = subprocess.run(
        [sys.executable, "-m", "router.ctl", "check-config", str(gw.config)],
        capture_output=True, text=True, cwd=ROOT, env={**ENV, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "rediss://***@127.0.0.1" in check.stdout
    for proc in cluster.procs:  # the replicas, the mock and the redis-server
        assert PASSWORD not in proc.output()
    assert PASSWORD not in check.stdout + check.stderr
    assert quote(PASSWORD, safe="") not in check.stdout
