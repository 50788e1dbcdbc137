"""Sentinel and Cluster URLs: parsed into their parts and query options, validated by the
config, masked when printed; the topologies' connections get the options."""

from __future__ import annotations

import re
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelManagedConnection

from router.config import masked_url, parse_config
from router.errors import ConfigError, StoreError
from router.redis_url import TLSOptions, TopologyURL, parse_url
from router.state.store import Store, _SentinelSSLConnection
from router.state.topology import ClusterTopology, SentinelTopology

SECRET = "s3cr%2Fet"
MINIMAL: dict[str, Any] = {
    "client_keys": [{"env": "CK"}],
    "providers": [{"name": "a", "kind": "openai", "base_url": "http://127.0.0.1:1/v1"}],
    "routes": [{"model": "m", "targets": [{"provider": "a", "model": "x"}]}],
}
"""The least config the checks pass (its redis_url is each test's)."""


def test_a_sentinel_url_gives_its_sentinels_primary_db_and_credentials() -> None:
    url = f"rediss+sentinel://app:{SECRET}@10.0.0.1:26379,[::1]:26380/main/3"
    assert parse_url(url) == TopologyURL(
        hosts=(("10.0.0.1", 26379), ("::1", 26380)),
        service="main", db=3, username="app", password="s3cr/et", tls=True, sentinel_tls=True,
    )  # fmt: skip
    assert parse_url("redis+sentinel://h:1/p").password is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h:1",
        "redis+sentinel://h/p",
        "redis+sentinel://h:1/p/x",
        "redis+sentinel://:1/p",
    ],
)
def test_a_malformed_sentinel_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="sentinel"):
        parse_url(url)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("redis+sentinel://a:1,b:2/main", True),
        (f"rediss+sentinel://u:{SECRET}@a:1/main/2", True),
        ("redis+sentinel://a:1,b:2", False),
        ("http://a:1/0", False),
        ("redis://a:1/0", True),
        ("redis+cluster://a:1,b:2", True),
        (f"rediss+cluster://u:{SECRET}@a:1/", True),
        ("redis+cluster://a:1/main", False),
    ],
)
def test_the_config_accepts_the_redis_schemes_only(url: str, ok: bool) -> None:
    problems = redis_url_problems(url, ok)
    assert all(SECRET not in text for _, text in problems)


def redis_url_problems(url: str, ok: bool) -> list[tuple[str, str]]:
    """The config's problems with ``url`` as ``redis_url``; asserts there are some unless
    ``ok``, and none about it when ``ok``."""
    problems: list[tuple[str, str]] = []
    try:
        parse_config({"redis_url": url}, {}, resolve=False)
    except ConfigError as exc:
        problems = list(exc.problems)
    wrong = [p for p in problems if p[0] == "redis_url"]
    assert not wrong if ok else wrong, problems
    return problems


def test_a_cluster_url_gives_its_nodes_and_credentials() -> None:
    url = f"redis+cluster://:{SECRET}@n1:7000,n2:7001"
    parsed = parse_url(url)
    assert parsed.hosts == (("n1", 7000), ("n2", 7001))
    assert (parsed.password, parsed.username, parsed.tls) == ("s3cr/et", None, False)
    with pytest.raises(ValueError, match="no path"):
        parse_url("redis+cluster://n1:7000/0")
    assert masked_url(url) == "redis+cluster://***@n1:7000,n2:7001"


def test_a_sentinel_urls_password_is_masked() -> None:
    shown = masked_url(f"redis+sentinel://app:{SECRET}@a:1,b:2/main/0")
    assert shown == "redis+sentinel://***@a:1,b:2/main/0"


TLS_QUERY = "ssl_ca_certs=/etc/r%20c/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"


def test_the_query_gives_the_tls_options_and_the_sentinels_credentials() -> None:
    url = (
        f"rediss+sentinel://app:{SECRET}@a:1,b:2/main?{TLS_QUERY}&ssl_cert_reqs=optional"
        f"&ssl_check_hostname=false&sentinel_username=watch&sentinel_password={SECRET}"
    )
    u = parse_url(url)
    assert u.tls_options == TLSOptions("/etc/r c/ca.pem", "/c.pem", "/k.pem", "optional", False)
    assert (u.sentinel_username, u.sentinel_password, u.sentinel_tls) == ("watch", "s3cr/et", True)
    assert u.sentinel_kwargs() == {
        "username": "watch", "password": "s3cr/et", "ssl": True, **u.tls_options.kwargs(),
    }  # fmt: skip
    assert u.tls_kwargs()["ssl_ca_certs"] == "/etc/r c/ca.pem"
    # the defaults: the server's certificate and name checked, the sentinels over TLS
    d = parse_url("rediss+cluster://n:1?ssl_ca_certs=/ca.pem")
    assert d.tls_options == TLSOptions(ca_certs="/ca.pem")
    assert (d.tls_options.cert_reqs, d.tls_options.check_hostname) == ("required", True)
    assert not parse_url("rediss+sentinel://a:1/m?ssl_cert_reqs=none").tls_options.check_hostname


def test_sentinels_may_be_plain_in_front_of_tls_data_nodes() -> None:
    u = parse_url(f"rediss+sentinel://a:1/main?sentinel_ssl=false&sentinel_password={SECRET}")
    assert (u.tls, u.sentinel_tls) == (True, False)
    assert u.sentinel_kwargs() == {"username": None, "password": "s3cr/et"}
    plain = parse_url(f"redis+sentinel://a:1/main?sentinel_password={SECRET}")
    assert (plain.tls_kwargs(), plain.sentinel_tls) == ({}, False)


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("ssl_ca_cert=/ca.pem", "unknown option 'ssl_ca_cert'"),
        ("password=x", "unknown option 'password'"),
        (f"sentinel_password=ab&{SECRET}x=1", "unknown option (not shown)"),
        (f"sentinel_password=ab&{SECRET}x", "unknown option (not shown)"),
        ("ssl_ca_certs=/a&ssl_ca_certs=/b", "ssl_ca_certs twice"),
        ("ssl_ca_certs=", "ssl_ca_certs needs a value"),
        ("sentinel_password", "sentinel_password needs a value"),
        ("ssl_cert_reqs=maybe", "ssl_cert_reqs is one of none, optional, required"),
        ("ssl_check_hostname=yes", "ssl_check_hostname is true or false"),
        ("sentinel_ssl=0", "sentinel_ssl is true or false"),
        ("ssl_ca_certs=/" + "a" * 4096, "ssl_ca_certs takes at most 4096 characters"),
        ("sentinel_password=" + "p" * 513, "sentinel_password takes at most 512 characters"),
        ("ssl_keyfile=/k.pem", "ssl_keyfile needs ssl_certfile"),
        ("sentinel_username=watch", "sentinel_username needs sentinel_password"),
        ("ssl_cert_reqs=none&ssl_check_hostname=true", "ssl_check_hostname=true needs"),
    ],
)
def test_a_wrong_option_is_named_and_no_value_shown(query: str, says: str) -> None:
    with pytest.raises(ValueError, match="(?s).*") as caught:
        parse_url(f"rediss+sentinel://u:{SECRET}@a:1/main?{query}")
    assert says in str(caught.value)
    assert SECRET not in str(caught.value)
    assert "s3cr/et" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://a:1/m?ssl_ca_certs=/ca.pem", "ssl_ca_certs needs TLS"),
        ("redis+cluster://a:1?ssl_cert_reqs=none", "ssl_cert_reqs needs TLS"),
        ("rediss+cluster://a:1?sentinel_password=x", "a sentinel URL's option"),
        ("redis+sentinel://a:1/m?sentinel_ssl=true", "sentinel_ssl takes a rediss+sentinel"),
    ],
)
def test_an_option_the_scheme_does_not_take_is_refused(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_url(url)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        (f"rediss+sentinel://u:p@a:1,b:2/main/2?{TLS_QUERY}&sentinel_password={SECRET}", True),
        (f"rediss+cluster://u:p@a:1,b:2?{TLS_QUERY}", True),
        (f"rediss+cluster://a:1/?{TLS_QUERY}", True),
        (f"redis+sentinel://a:1/main?sentinel_username=w&sentinel_password={SECRET}", True),
        (f"redis+sentinel://a:1/main?ssl_ca_certs=/ca.pem&sentinel_password={SECRET}", False),
        (f"rediss+cluster://a:1?ssl_ca_cert=/ca.pem&x={SECRET}", False),
    ],
)
def test_the_config_checks_the_query(url: str, ok: bool) -> None:
    problems = redis_url_problems(url, ok)
    assert all(SECRET not in text and "s3cr/et" not in text for _, text in problems)


def test_the_sentinels_password_is_masked_like_the_main_one() -> None:
    url = (
        f"rediss+sentinel://app:{SECRET}@a:1/main/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
        f"&sentinel_ssl=true&sentinel_username=watch&sentinel_password={SECRET}"
    )
    assert masked_url(url) == (
        "rediss+sentinel://***@a:1/main/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
        "&sentinel_ssl=true&sentinel_username=***&sentinel_password=***"
    )


def test_every_connection_of_a_sentinel_topology_gets_the_tls_options() -> None:
    url = (
        f"rediss+sentinel://app:{SECRET}@127.0.0.1:1/main?ssl_ca_certs=/ca.pem"
        f"&sentinel_username=watch&sentinel_password={SECRET}"
    )
    topo = SentinelTopology(url, {"socket_timeout": 1.0}, 2.0)
    for sentinel in topo.sentinel.sentinels:
        kw = sentinel.connection_pool.connection_kwargs
        assert sentinel.connection_pool.connection_class is aioredis.SSLConnection
        assert (kw["ssl_ca_certs"], kw["username"], kw["password"]) == (
            "/ca.pem",
            "watch",
            "s3cr/et",
        )
    for pool in (topo.pool(4), topo.pool(1, socket_timeout=None)):
        kw = pool.connection_kwargs
        assert (kw["ssl_ca_certs"], kw["username"], kw["password"]) == ("/ca.pem", "app", "s3cr/et")
        assert kw["ssl_check_hostname"] is True


def test_every_connection_of_a_cluster_topology_gets_the_tls_options() -> None:
    url = f"rediss+cluster://app:{SECRET}@127.0.0.1:1?ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional"
    topo = ClusterTopology(url, {"socket_timeout": 1.0}, 4, "{p}k", pool_wait_s=2.0)
    node_kwargs = topo.client.nodes_manager.connection_kwargs
    assert (node_kwargs["ssl_ca_certs"], node_kwargs["ssl_cert_reqs"]) == ("/ca.pem", "optional")
    pool = topo.subscriber_pool()
    assert pool.connection_class is aioredis.SSLConnection
    assert (pool.connection_kwargs["ssl_ca_certs"], pool.connection_kwargs["password"]) == (
        "/ca.pem", "s3cr/et",
    )  # fmt: skip


def test_redis_url_from_the_environment_is_checked_too() -> None:
    env = {"REDIS_URL": f"rediss+cluster://u:{SECRET}@a:1?ssl_ca_cert=/ca.pem"}
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL, env, resolve=False)
    problems = dict(caught.value.problems)
    assert "unknown option 'ssl_ca_cert'" in problems["REDIS_URL"]
    assert SECRET not in str(caught.value.problems)
    good = {"REDIS_URL": f"rediss+cluster://u:{SECRET}@a:1?ssl_ca_certs=/ca.pem"}
    assert parse_config(MINIMAL, good, resolve=False).redis_url == good["REDIS_URL"]


def test_a_tls_sentinel_stores_pooled_connections_pack_with_hiredis() -> None:
    """Over TLS the scripts go through the pool: its connections (and the subscriptions')
    pack with hiredis as rediss:// ones do; without TLS, the shared connection runs them."""
    for url, cls, mux in [
        ("rediss+sentinel://a:1/m?ssl_ca_certs=/ca.pem", _SentinelSSLConnection, False),
        ("redis+sentinel://a:1/m", SentinelManagedConnection, True),
    ]:
        store = Store.from_config(parse_config({**MINIMAL, "redis_url": url}, {}, resolve=False))
        assert store.client.connection_pool.connection_class is cls
        assert store.subscriber_pool is not None
        assert store.subscriber_pool().connection_class is cls
        assert (store.mux is not None) is mux


@pytest.mark.parametrize(
    "url",
    [
        "rediss+sentinel://a:1/m?ssl_ca_certs=/nonexistent/ca.pem",
        "rediss+cluster://a:1?ssl_ca_certs=/nonexistent/ca.pem",
        "rediss://a:1/0?ssl_ca_certs=/nonexistent/ca.pem",
    ],
)
async def test_an_unreadable_tls_file_fails_the_start_naming_it(url: str) -> None:
    store = Store.from_config(parse_config({**MINIMAL, "redis_url": url}, {}, resolve=False))
    with pytest.raises(StoreError, match="ssl_ca_certs /nonexistent/ca.pem: No such file"):
        await store.start()
