"""The upstream client's egress settings against real servers on loopback: a provider's
``max_connections`` (requests past it wait for a connection, never more are opened), its
``tls`` (CA, client certificate: mutual TLS against the mock provider serving HTTPS) and the
forward proxy (a real one, proxy.py, behind a relay that counts the connections to it)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from healthd.probe import ProbeClients, probe
from loadtest.procs import free_port
from router.config import Provider, ProviderTLS, Timeouts
from router.errors import UpstreamConnectError, UpstreamTimeout
from router.upstream.client import Upstream
from router.upstream.providers.base import UpstreamRequest
from router.upstream.tlsfiles import TLSContexts
from tests.helpers import async_wait_until, port_open, wait_until
from tests.integration.inproc import Start as StartMock

pytestmark = pytest.mark.slow

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
TIMEOUTS = Timeouts(connect_s=5.0, read_s=10.0)


def provider(url: str, **fields: Any) -> Provider:
    return Provider.model_validate({"name": "p", "kind": "openai", "base_url": url, **fields})


async def call(up: Upstream, url: str, prov: Provider, within: float = 20.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    req = UpstreamRequest(f"{url}/v1/chat/completions", {"content-type": "application/json"}, BODY)
    async with await up.send(req, TIMEOUTS, deadline, provider=prov) as resp:
        await resp.read(deadline)
        return resp.status


@dataclass
class Counter:
    """A TCP relay in front of a server that counts the connections through it."""

    port: int = 0
    accepted: int = 0
    live: int = 0
    peak: int = 0


@contextlib.asynccontextmanager
async def counting_relay(target_port: int) -> AsyncIterator[Counter]:
    counter = Counter()
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        counter.accepted += 1
        counter.live += 1
        counter.peak = max(counter.peak, counter.live)
        try:  # the client's side is closed even when the target's cannot be opened
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
            try:
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            counter.live -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    counter.port = server.sockets[0].getsockname()[1]
    try:
        yield counter
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_max_connections_caps_the_connections_and_the_rest_wait(
    upstream: Upstream, start_mock: StartMock
) -> None:
    mock = await start_mock(latency_ms=300.0)
    async with counting_relay(mock.port) as relay:
        url = f"http://127.0.0.1:{relay.port}"
        prov = provider(url, max_connections=4)
        statuses = await asyncio.gather(*(call(upstream, url, prov) for _ in range(50)))
        assert statuses == [200] * 50
        assert relay.peak <= 4
        assert relay.accepted <= 4
    assert mock.provider.stats.in_flight_peak <= 4


async def test_a_request_waits_for_a_connection_until_its_deadline(
    upstream: Upstream, start_mock: StartMock
) -> None:
    mock = await start_mock(latency_ms=3000.0)
    url = f"http://127.0.0.1:{mock.port}"
    prov = provider(url, max_connections=1)
    holder = asyncio.create_task(call(upstream, url, prov))

    async def holding() -> bool:
        return mock.provider.stats.in_flight == 1

    await async_wait_until(holding, what="the first request in flight")
    with pytest.raises(UpstreamTimeout, match="waited for a connection"):
        await call(upstream, url, prov, within=0.2)
    assert await holder == 200
    assert await call(upstream, url, prov) == 200  # the slot came back


async def test_a_closed_connection_hands_its_slot_on(
    upstream: Upstream, start_mock: StartMock
) -> None:
    """A connection that fails (the provider went away) frees its slot for the waiter."""
    mock = await start_mock(latency_ms=300.0)
    url = f"http://127.0.0.1:{mock.port}"
    prov = provider(url, max_connections=1)
    dead = provider("http://127.0.0.1:1", max_connections=1)  # refused: slot freed at once
    for _ in range(3):
        with pytest.raises(UpstreamConnectError):
            await call(upstream, "http://127.0.0.1:1", dead)
    results = await asyncio.gather(*(call(upstream, url, prov) for _ in range(5)))
    assert results == [200] * 5


# TLS -----------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def mtls_server(self) -> dict[str, str]:
        """The mock's options: serve HTTPS with the server cert, require a client cert."""
        return {"tls_cert": str(self.server_cert), "tls_key": str(self.server_key),
                "tls_client_ca": str(self.ca)}  # fmt: skip

    def client_tls(self) -> dict[str, str]:
        """A provider's ``tls``: the CA and the client cert it signed."""
        return {"ca_file": str(self.ca), "cert_file": str(self.client_cert),
                "key_file": str(self.client_key)}  # fmt: skip


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip


def _make_leaf(d: Path, name: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server cert for 127.0.0.1 and a client cert it signed; another CA."""
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other")
    _make_leaf(d, "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _make_leaf(d, "client", "extendedKeyUsage=clientAuth\n")
    return Pki(d / "ca.pem", d / "other.pem", d / "server.pem", d / "server.key",
               d / "client.pem", d / "client.key")  # fmt: skip


async def test_mutual_tls_with_the_providers_ca_and_client_cert(
    upstream: Upstream, start_mock: StartMock, pki: Pki
) -> None:
    mock = await start_mock(**pki.mtls_server())
    url = f"https://127.0.0.1:{mock.port}"
    tls = pki.client_tls()
    prov = provider(url, tls=tls)
    assert [await call(upstream, url, prov) for _ in range(3)] == [200] * 3
    assert mock.provider.stats.in_flight_peak == 1

    with pytest.raises(UpstreamConnectError, match="TLS"):  # no client cert
        await call(upstream, url, provider(url, tls={"ca_file": str(pki.ca)}))
    with pytest.raises(UpstreamConnectError, match="TLS handshake failed"):  # not our CA
        await call(upstream, url, provider(url, tls={**tls, "ca_file": str(pki.other_ca)}))
    with pytest.raises(UpstreamConnectError, match="TLS handshake failed"):  # system CAs
        await call(upstream, url, provider(url))


async def test_renewed_tls_files_are_used_by_the_next_connections(
    start_mock: StartMock, pki: Pki, tmp_path: Path
) -> None:
    """The provider's CA bundle is replaced on disk (a rotated CA, a renewed mounted secret):
    new connections use it without a restart; healthd's probe client follows too."""
    mock = await start_mock(**pki.mtls_server())
    url = f"https://127.0.0.1:{mock.port}"
    ca = tmp_path / "ca-bundle.pem"
    shutil.copyfile(pki.other_ca, ca)  # the wrong CA first
    prov = provider(url, tls={**pki.client_tls(), "ca_file": str(ca)})
    up = Upstream(tls_recheck_s=0)  # re-check at every new connection (10 s by default)
    await up.start()
    probes = ProbeClients(TLSContexts(recheck_s=0))
    try:
        with pytest.raises(UpstreamConnectError, match="TLS handshake failed"):
            await call(up, url, prov)
        with pytest.raises(httpx.ConnectError):
            await probes.of(prov).get(f"{url}/v1/models")
        shutil.copyfile(pki.ca, ca)
        assert await call(up, url, prov) == 200
        assert (await probes.of(prov).get(f"{url}/v1/models")).status_code == 200
    finally:
        await up.close()
        await probes.close()


async def test_verify_false_accepts_any_certificate(
    upstream: Upstream, start_mock: StartMock, pki: Pki
) -> None:
    mock = await start_mock(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    url = f"https://127.0.0.1:{mock.port}"
    assert await call(upstream, url, provider(url, tls={"verify": False})) == 200


async def test_an_unreadable_ca_file_is_a_clear_connect_error(
    upstream: Upstream, tmp_path: Path
) -> None:
    url = "https://127.0.0.1:1"
    prov = provider(url, tls={"ca_file": str(tmp_path / "missing.pem")})
    with pytest.raises(UpstreamConnectError, match="TLS setup failed") as info:
        await call(upstream, url, prov)
    assert "missing.pem" not in str(info.value)


def test_tls_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="key_file needs cert_file"):
        ProviderTLS(key_file="k.pem")
    with pytest.raises(ValueError, match="max_connections"):
        provider("http://x", max_connections=0)
    with pytest.raises(ValueError, match="max_connections"):
        provider("http://x", max_connections=10_001)


# Proxies ---------------------------------------------------------------------------------

PROXY_USER, PROXY_PASSWORD = "router", "s3cret-pw"


@pytest.fixture(scope="module")
def forward_proxy() -> Iterator[int]:
    """A real forward proxy on loopback (proxy.py) asking for Basic credentials: its port."""
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port),
            "--basic-auth", f"{PROXY_USER}:{PROXY_PASSWORD}", "--num-workers", "1",
            "--num-acceptors", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 20.0, "proxy.py listening")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def proxy_url(port: int, password: str = PROXY_PASSWORD) -> str:
    return f"http://{PROXY_USER}:{password}@127.0.0.1:{port}"


async def stream_text(up: Upstream, url: str, prov: Provider | None = None) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    body = orjson.dumps({**orjson.loads(BODY), "stream": True})
    req = UpstreamRequest(f"{url}/v1/chat/completions", {"content-type": "application/json"}, body)
    async with await up.send(req, TIMEOUTS, deadline, provider=prov) as resp:
        assert resp.status == 200
        return b"".join([chunk async for chunk in resp.chunks()]).decode()


async def test_the_environments_proxy_carries_plain_and_streamed_requests(
    start_mock: StartMock, forward_proxy: int
) -> None:
    mock = await start_mock()
    url = f"http://127.0.0.1:{mock.port}"
    async with counting_relay(forward_proxy) as relay:
        up = Upstream()
        await up.start({"http_proxy": proxy_url(relay.port), "HTTPS_PROXY": "http://unused:1"})
        try:
            assert await call(up, url, provider(url)) == 200
            assert "data: [DONE]" in await stream_text(up, url, provider(url))
        finally:
            await up.close()
        assert relay.accepted == 1  # one tunnel, kept alive for both
    assert mock.provider.stats.in_flight_peak == 1


async def test_an_https_provider_through_the_proxy_speaks_tls_inside_the_tunnel(
    start_mock: StartMock, forward_proxy: int, pki: Pki
) -> None:
    mock = await start_mock(**pki.mtls_server())
    url = f"https://127.0.0.1:{mock.port}"
    tls = pki.client_tls()
    async with counting_relay(forward_proxy) as relay:
        prov = provider(url, tls=tls, proxy=proxy_url(relay.port))
        up = Upstream()
        await up.start({})
        try:
            assert await call(up, url, prov) == 200
            assert "data: [DONE]" in await stream_text(up, url, prov)
        finally:
            await up.close()
        assert relay.accepted == 1


async def test_no_proxy_and_proxy_none_go_direct(start_mock: StartMock, forward_proxy: int) -> None:
    mock = await start_mock()
    url = f"http://127.0.0.1:{mock.port}"
    async with counting_relay(forward_proxy) as relay:
        for env, prov in [
            ({"HTTP_PROXY": proxy_url(relay.port), "NO_PROXY": "example.com, 127.0.0.1"},
             provider(url)),
            ({"HTTP_PROXY": proxy_url(relay.port)}, provider(url, proxy="none")),
        ]:  # fmt: skip
            up = Upstream()
            await up.start(env)
            try:
                assert await call(up, url, prov) == 200
            finally:
                await up.close()
        assert relay.accepted == 0


async def test_a_proxy_that_refuses_or_is_gone_is_a_connect_error_naming_no_secret(
    upstream: Upstream, start_mock: StartMock, forward_proxy: int
) -> None:
    mock = await start_mock()
    url = f"http://127.0.0.1:{mock.port}"
    wrong = provider(url, proxy=proxy_url(forward_proxy, password="wrong-pw"))
    with pytest.raises(UpstreamConnectError, match=r"wants credentials \(407\)") as info:
        await call(upstream, url, wrong)
    assert "wrong-pw" not in str(info.value)
    gone = provider(url, proxy=proxy_url(free_port()))
    with pytest.raises(UpstreamConnectError, match="could not connect to the proxy") as info:
        await call(upstream, url, gone)
    assert PROXY_PASSWORD not in str(info.value)
    assert mock.provider.stats.in_flight_peak == 0


# DNS ---------------------------------------------------------------------------------------


@dataclass
class Lookups:
    """Counts the event loop's getaddrinfo calls by host; the first answers can be stale."""

    calls: list[str] = field(default_factory=list)
    stale: int = 0
    """How many first answers point at 127.0.0.2 (where nothing listens: a moved provider)."""


@pytest.fixture
async def lookups(monkeypatch: pytest.MonkeyPatch) -> Lookups:
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    seen = Lookups()

    async def counting(host: Any, port: Any, **kwargs: Any) -> Any:
        seen.calls.append(str(host))
        infos = await real(host, port, **kwargs)
        if seen.stale:
            seen.stale -= 1
            return [(socket.AF_INET, *i[1:4], ("127.0.0.2", port)) for i in infos[:1]]
        return infos

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    return seen


async def test_a_name_is_looked_up_once_per_ttl(start_mock: StartMock, lookups: Lookups) -> None:
    mock = await start_mock(latency_ms=100.0)
    url = f"http://localhost:{mock.port}"
    for ttl, expected in [(30.0, 1), (0.0, 2)]:
        lookups.calls.clear()
        up = Upstream(dns_ttl_s=ttl)
        await up.start({})
        try:
            statuses = await asyncio.gather(*(call(up, url, provider(url)) for _ in range(5)))
            await up.close()  # every connection closed: the next call opens one
            statuses.append(await call(up, url, provider(url)))
        finally:
            await up.close()
        assert statuses == [200] * 6
        assert lookups.calls == ["localhost"] * expected
    assert mock.provider.stats.in_flight_peak >= 2  # (concurrent connections shared a lookup)


async def test_a_refused_cached_address_is_looked_up_again(
    upstream: Upstream, start_mock: StartMock, lookups: Lookups
) -> None:
    mock = await start_mock()
    url = f"http://localhost:{mock.port}"
    lookups.stale = 1  # the first answer: 127.0.0.2, where nothing listens
    with pytest.raises(UpstreamConnectError, match="could not connect"):
        await call(upstream, url, provider(url))  # a fresh answer refused: no second lookup
    assert lookups.calls == ["localhost"]
    assert await call(upstream, url, provider(url)) == 200  # cached, refused, looked up again
    assert lookups.calls == ["localhost"] * 2


async def test_healthds_probes_reach_a_provider_the_way_requests_do(
    start_mock: StartMock, pki: Pki, forward_proxy: int
) -> None:
    """healthd probes over httpx, with the provider's own TLS settings and proxy: a provider
    behind mutual TLS is probed up, and is down to a probe without its client certificate."""
    mock = await start_mock(**pki.mtls_server())
    url = f"https://127.0.0.1:{mock.port}/v1"
    tls = pki.client_tls()
    clients = ProbeClients()
    try:
        with_cert = provider(url, tls=tls)
        assert (await probe(clients.of(with_cert), with_cert)).ok
        without = provider(url, tls={"ca_file": str(pki.ca)})
        result = await probe(clients.of(without), without)
        assert not result.ok
        assert "connect failed" in result.error or "request failed" in result.error
        plain = await start_mock()
        proxied = provider(f"http://127.0.0.1:{plain.port}/v1", proxy=proxy_url(forward_proxy))
        assert (await probe(clients.of(proxied), proxied)).ok
        assert clients.of(with_cert) is clients.of(provider(url, tls=tls))  # one per setting
    finally:
        await clients.close()
