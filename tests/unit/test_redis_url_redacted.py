"""A Redis URL is shown with its password replaced, wherever the password is written."""

from __future__ import annotations

import pytest

from router.config import redacted_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
        ("rediss://app:s3cret@cache:6380/1?ssl_ca_certs=/ca.pem",
         "rediss://app:***@cache:6380/1?ssl_ca_certs=/ca.pem"),
        ("redis://cache:6379/0?password=s3cret&db=2", "redis://cache:6379/0?password=***&db=2"),
        ("unix:///run/redis.sock?db=0&Password=s3cret", "unix:///run/redis.sock?db=0&Password=***"),
        ("redis://app@cache:6379", "redis://app@cache:6379"),  # a user name is no secret
    ],
)  # fmt: skip
def test_the_password_is_replaced(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
    assert "s3cret" not in redacted_url(url)
