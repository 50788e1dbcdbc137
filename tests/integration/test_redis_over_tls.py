"""A replica on ``rediss://``: a real redis-server with TLS on loopback, its certificate signed
by a CA made here. The scripts and the health subscription both go over TLS, through the
project's own TLS connection class, and the Redis password shows up nowhere."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis

from router.config import Config, load_config
from router.state.health import HealthStore
from router.state.keys import Keys
from router.state.store import Store, _SSLConnection
from tests.helpers import (
    ENV,
    ROOT,
    Cluster,
    Mock,
    auth,
    free_port,
    port_open,
    redis_server_binary,
    start_gateway,
    wait_until,
)

PASSWORD = "tls-redis-password-5f3a9c"
KEYS = Keys("rc", "default")
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing (Debian: apt-get install -y openssl)")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(d: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1; their paths (CA, cert, key)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = d / "ca.crt", d / "ca.key"
    openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", "/CN=router-cluster test CA")  # fmt: skip
    key, csr, cert = d / "server.key", d / "server.csr", d / "server.crt"
    openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = d / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


class TlsRedis:
    def __init__(self, port: int, ca: Path) -> None:
        self.port = port
        self.ca = ca

    @property
    def url(self) -> str:
        return f"rediss://:{PASSWORD}@127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.ca))}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=PASSWORD, ssl=True,
                           ssl_ca_certs=str(self.ca), decode_responses=True)  # fmt: skip


@pytest.fixture
def tls_redis(cluster: Cluster, tmp_path: Path) -> TlsRedis:
    """A redis-server that speaks only TLS (no plain port) and wants a password; the
    cluster stops it."""
    ca, cert, key = make_certificates(tmp_path)
    port = free_port()
    argv = [
        redis_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "no", "--requirepass", PASSWORD, "--save", "",
        "--appendonly", "no", "--dir", str(tmp_path),
    ]  # fmt: skip
    cluster.start(f"redis-tls-{port}", argv)
    wait_until(lambda: port_open(port), 10, "the TLS redis-server to listen")
    return TlsRedis(port, ca)


def config_of(path: Path) -> Config:
    return load_config(path, dict(ENV))


async def drain_through_the_store(cfg: Config, provider: str) -> None:
    store = Store.from_config(cfg)
    await store.start()
    try:
        await HealthStore(store).set_drain(provider, True)
    finally:
        await store.close()


def test_a_replica_on_rediss_runs_its_scripts_and_hears_health_events(
    cluster: Cluster, tmp_path: Path, tls_redis: TlsRedis
) -> None:
    routes = [{"model": "chat", "targets": [{"provider": "p", "model": "m"}]}]
    gw = start_gateway(cluster, tmp_path, tls_redis.url, [Mock("p")], routes, replicas=1)
    cfg = config_of(gw.config)

    # the scripts, over TLS: the request is decided in Redis and counted there
    r = httpx.post(f"{gw.urls[0]}/v1/chat/completions", json=CHAT, headers=auth(), timeout=10)
    assert r.status_code == 200, r.text
    direct = tls_redis.client()
    assert direct.hget(KEYS.provider("p"), "rpm") == "1"
    wait_until(lambda: direct.hget(KEYS.provider("p"), "o:ok") == "1", 5, "the release")

    # the health subscription, over TLS: a drain written elsewhere reaches the replica by
    # pub/sub (its periodic re-read, replica.resync_s, is 30 s away)
    def drained() -> bool:
        body = httpx.get(f"{gw.urls[0]}/readyz", timeout=5).json()
        return bool(body["status"] == "ready" and body["providers"]["p"]["drained"])

    assert not drained()
    asyncio.run(drain_through_the_store(cfg, "p"))
    wait_until(drained, 10, "the replica to hear of the drain")

    # the project's connection class (hiredis packing), not redis-py's plain SSLConnection
    used = Store.from_config(cfg).client.connection_pool.connection_class
    assert used is _SSLConnection, used.__name__

    # the password is in the URL; it must be in no output
    check = subprocess.run(
        [sys.executable, "-m", "router.ctl", "check-config", str(gw.config)],
        capture_output=True, text=True, cwd=ROOT, env={**ENV, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "rediss://" in check.stdout
    for proc, _ in gw.replicas:
        assert PASSWORD not in proc.output()
    assert PASSWORD not in check.stdout + check.stderr
