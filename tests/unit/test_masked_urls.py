"""Every URL we print goes through ``masked_url``: no user, no password, in any form."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.config import masked_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://ops:s3cret@10.0.0.5:6380/2", "redis://***@10.0.0.5:6380/2"),
        ("redis://:s3cret@cache", "redis://***@cache"),
        ("redis://ops@cache:6379", "redis://***@cache:6379"),
        ("rediss://ops:s3cret@[::1]:6380/0", "rediss://***@[::1]:6380/0"),
        ("unix://ops:s3cret@/run/redis.sock?db=3", "unix://***@/run/redis.sock?db=3"),
        ("redis://cache:6379/0?password=s3cret&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("redis://a:b@c@cache/0", "redis://***@cache/0"),  # an unescaped @ in the password
        ("ops:s3cret@cache:6379", "***@cache:6379"),  # no scheme: still masked
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),  # nothing to hide
        ("redis://ops:pa/ss?w#rd@cache/0", "redis://***@cache/0"),  # unescaped / ? #
        ("redis://cache/0?client_name=a@b", "redis://***"),  # an @ in a value: all hidden
        ("redis://cache/0?password=ab&cd", "redis://cache/0?password=***&***"),  # a piece of it
        ("redis://cache/0?password=ab&cd=ef", "redis://cache/0?password=***&***"),
        (
            "rediss+sentinel://u:p@a:1,b:2/m/0?ssl_ca_certs=/ca.pem&sentinel_ssl=false"
            "&sentinel_username=watch&sentinel_password=s3cret",
            "rediss+sentinel://***@a:1,b:2/m/0?ssl_ca_certs=/ca.pem&sentinel_ssl=false"
            "&sentinel_username=***&sentinel_password=***",
        ),
        ("redis+sentinel://a:1/m?sentinel_password=p@ss", "redis+sentinel://***"),
        ("rediss+cluster://a:1?ssl_cert_reqs=none", "rediss+cluster://a:1?ssl_cert_reqs=none"),
        ("redis://cache/0#s3cret", "redis://cache/0"),
    ],
)
def test_user_password_and_query_secrets_are_masked(url: str, shown: str) -> None:
    assert masked_url(url) == shown


secret = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-_.~!$&'()*+,;=:@/%", min_size=1)


@given(user=secret, password=secret, scheme=st.sampled_from(["redis", "rediss", "unix"]))
def test_no_user_or_password_survives(user: str, password: str, scheme: str) -> None:
    user, password = f"U{user}", f"P{password}"  # a marker no fixed part of the URL holds
    for userinfo in (f"{quote(user, safe='')}:{quote(password, safe='')}", f"{user}:{password}"):
        shown = masked_url(f"{scheme}://{userinfo}@cache.internal:6379/0")
        assert quote(password, safe="") not in shown
        assert password not in shown
        assert user not in shown


query_secret = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-_.~!$&'()*+,;=:@/%?#", min_size=1)


@given(password=query_secret, scheme=st.sampled_from(["redis+sentinel", "rediss+sentinel"]))
def test_no_piece_of_a_sentinel_password_survives(password: str, scheme: str) -> None:
    """The password's letters are capitals, the URL's own text has none: no capital may show,
    whether the password was percent-encoded or pasted as it is (``&``, ``@``, ``#``...)."""
    password = f"P{password}Q"
    for value in (quote(password, safe=""), password):
        url = f"{scheme}://u:p@a:1,b:2/main/0?sentinel_password={value}&ssl_cert_reqs=none"
        shown = masked_url(url)
        assert not any(c.isupper() for c in shown), shown
