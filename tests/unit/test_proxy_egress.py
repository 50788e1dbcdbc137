"""Which proxy a provider URL goes through (router/upstream/proxy.py): the environment's
variables read once, NO_PROXY's matching, a proxy URL's credentials."""

from __future__ import annotations

import asyncio
import base64
import gc

import pytest

from router.config import Provider
from router.errors import UpstreamConnectError
from router.upstream.proxy import Proxy, ProxyEnv, _ConnectAnswer, parse_proxy


def test_a_proxy_url_with_credentials_gives_a_basic_header_and_hides_them() -> None:
    proxy = parse_proxy("http://us%40er:p%3Ass@proxy.local:3128")
    assert (proxy.host, proxy.port) == ("proxy.local", 3128)
    assert proxy.authorization == b"Proxy-Authorization: Basic " + base64.b64encode(b"us@er:p:ss")
    assert proxy.shown == "proxy.local:3128"
    assert parse_proxy("proxy.local:8080") == Proxy("proxy.local", 8080)
    assert parse_proxy("http://proxy.local") == Proxy("proxy.local", 80)


@pytest.mark.parametrize(
    "url", ["https://proxy:443", "socks5://proxy:1080", "http://", "http://p:x"]
)
def test_unsupported_proxy_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="proxy"):
        parse_proxy(url)


def test_lower_case_variables_win_and_each_scheme_has_its_own() -> None:
    env = ProxyEnv.from_environ(
        {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "HTTP_PROXY": "h:3"}
    )
    assert env.for_target("https", "api.example.com") == Proxy("lower", 2)
    assert env.for_target("http", "api.example.com") == Proxy("h", 3)
    assert ProxyEnv.from_environ({}).for_target("https", "x") is None


@pytest.mark.parametrize(
    ("no_proxy", "host", "bypassed"),
    [
        ("example.com", "example.com", True),
        ("example.com", "api.example.com", True),
        (".example.com", "api.example.com", True),
        (".example.com", "example.com", True),
        ("example.com", "badexample.com", False),
        ("*", "anything.org", True),
        ("10.0.0.1, localhost", "localhost", True),
        ("10.0.0.1,localhost", "10.0.0.1", True),
        ("10.0.0.1", "10.0.0.10", False),
        ("internal:8443", "internal", True),
        ("[::1]", "::1", True),
        ("::1", "::1", True),
        ("EXAMPLE.com", "Api.Example.COM", True),
        ("", "example.com", False),
    ],
)
def test_no_proxy_matches_hosts_domains_and_addresses(
    no_proxy: str, host: str, bypassed: bool
) -> None:
    env = ProxyEnv.from_environ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": no_proxy})
    assert env.bypassed(host) is bypassed
    assert (env.for_target("https", host) is None) is bypassed


def test_a_providers_proxy_setting_is_checked() -> None:
    base = {"name": "p", "kind": "openai", "base_url": "https://api.example.com"}
    assert Provider.model_validate({**base, "proxy": "none"}).proxy == "none"
    assert Provider.model_validate({**base, "proxy": "http://u:p@proxy:3128"}).proxy
    for bad in ("https://proxy:3128", "socks5://proxy", "http://proxy:3128/path", "direct"):
        with pytest.raises(ValueError, match="proxy"):
            Provider.model_validate({**base, "proxy": bad})


async def test_a_connect_answer_nobody_awaits_is_not_logged_when_the_proxy_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connect to the proxy given up (its timeout) as the connection was made: asyncio
    closes the transport, the proxy's answer is never awaited, and its error is no log line
    ("Future exception was never retrieved") when the future is collected."""
    answer = _ConnectAnswer(asyncio.get_running_loop(), Proxy("proxy.local", 3128))
    answer.connection_lost(None)
    del answer
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_connect_answer_awaited_still_fails_when_the_proxy_closes() -> None:
    answer = _ConnectAnswer(asyncio.get_running_loop(), Proxy("proxy.local", 3128))
    answer.connection_lost(None)
    with pytest.raises(UpstreamConnectError, match="closed the connection during CONNECT"):
        await answer.head
