"""Sentinel URLs: parsed into their parts, validated by the config, masked when printed."""

from __future__ import annotations

import pytest

from router.config import masked_url, parse_config
from router.errors import ConfigError
from router.state.topology import TopologyURL, parse_url

SECRET = "s3cr%2Fet"


def test_a_sentinel_url_gives_its_sentinels_primary_db_and_credentials() -> None:
    url = f"rediss+sentinel://app:{SECRET}@10.0.0.1:26379,[::1]:26380/main/3"
    assert parse_url(url) == TopologyURL(
        hosts=(("10.0.0.1", 26379), ("::1", 26380)),
        service="main", db=3, username="app", password="s3cr/et", tls=True,
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
    problems: list[tuple[str, str]] = []
    try:
        parse_config({"redis_url": url}, {}, resolve=False)
    except ConfigError as exc:
        problems = list(exc.problems)
    wrong = [p for p in problems if p[0] == "redis_url"]
    assert not wrong if ok else wrong, problems
    assert all(SECRET not in text for _, text in problems)


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
