"""router/errors.py: each error's HTTP status, OpenAI-shaped body and extra headers."""

from __future__ import annotations

import pytest

from router.errors import (
    AllAttemptsFailed,
    Attempt,
    BadRequest,
    ClientError,
    ConfigError,
    Forbidden,
    ModelNotFound,
    PayloadTooLarge,
    ProviderClientError,
    RouterError,
    Saturated,
    StoreError,
    Unauthorized,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamStatusError,
    UpstreamTimeout,
    to_openai_error,
)

ATTEMPTS = [
    Attempt("fast", "timeout", "read timed out after 2.0s"),
    Attempt("slow", "http_5xx", "503 Service Unavailable"),
]


@pytest.mark.parametrize(
    ("err", "status", "type_", "code"),
    [
        pytest.param(BadRequest("bad body"), 400, "invalid_request_error", "invalid_request"),
        pytest.param(Unauthorized("no key"), 401, "authentication_error", "invalid_api_key"),
        pytest.param(Forbidden("admin only"), 403, "permission_error", "forbidden"),
        pytest.param(ModelNotFound("no route"), 404, "invalid_request_error", "model_not_found"),
        pytest.param(PayloadTooLarge("too big"), 413, "invalid_request_error", "request_too_large"),
        pytest.param(
            ProviderClientError(422, "bad", "p"), 422, "invalid_request_error", "invalid_request"
        ),
        pytest.param(Saturated("full", 1.0), 429, "rate_limit_error", "saturated"),
        pytest.param(StoreError("redis down"), 503, "server_error", "shared_state_unavailable"),
        pytest.param(ConfigError([("a", "b")]), 500, "server_error", "internal_error"),
        pytest.param(RouterError("oops"), 500, "server_error", "internal_error"),
        pytest.param(UpstreamError("x"), 502, "server_error", "upstream_error"),
        pytest.param(UpstreamConnectError("x"), 502, "server_error", "upstream_error"),
        pytest.param(UpstreamTimeout("x"), 504, "server_error", "upstream_timeout"),
        pytest.param(UpstreamStatusError("x", 500), 502, "server_error", "upstream_error"),
        pytest.param(UpstreamRateLimited("x", 3.0), 502, "server_error", "upstream_error"),
        pytest.param(UpstreamProtocolError("x"), 502, "server_error", "upstream_error"),
        pytest.param(AllAttemptsFailed(ATTEMPTS, 502), 502, "server_error", "all_attempts_failed"),
        pytest.param(AllAttemptsFailed(ATTEMPTS, 503), 503, "server_error", "all_attempts_failed"),
        pytest.param(AllAttemptsFailed(ATTEMPTS, 504), 504, "server_error", "all_attempts_failed"),
        pytest.param(
            AllAttemptsFailed(ATTEMPTS, 429), 429, "rate_limit_error", "all_attempts_failed"
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, RouterError) else None,
)
def test_status_and_openai_body(err: RouterError, status: int, type_: str, code: str) -> None:
    assert err.status == status
    assert to_openai_error(err) == {
        "error": {"message": str(err), "type": type_, "code": code, "param": None}
    }


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (BadRequest("the body must be a JSON object"), "the body must be a JSON object"),
        (Unauthorized("missing bearer key"), "missing bearer key"),
        (
            ProviderClientError(400, "context too long", "claude"),
            "provider claude rejected the request: context too long",
        ),
        (ConfigError([("a.b", "must be > 0"), ("", "whole")]), "a.b: must be > 0\nwhole"),
    ],
)
def test_message_is_the_errors_text(err: RouterError, message: str) -> None:
    assert to_openai_error(err)["error"]["message"] == message


def test_bad_request_carries_its_param() -> None:
    err = BadRequest("invalid value for 'max_tokens': too big", param="max_tokens")
    assert to_openai_error(err) == {
        "error": {
            "message": "invalid value for 'max_tokens': too big",
            "type": "invalid_request_error",
            "code": "invalid_request",
            "param": "max_tokens",
        }
    }


def test_the_client_errors_are_client_errors() -> None:
    for cls in (BadRequest, Unauthorized, Forbidden, ModelNotFound, PayloadTooLarge):
        assert issubclass(cls, ClientError)
    assert issubclass(ProviderClientError, ClientError)
    assert not issubclass(Saturated, ClientError)
    assert issubclass(UpstreamRateLimited, UpstreamStatusError)


@pytest.mark.parametrize(
    ("err", "outcome"),
    [
        (UpstreamError("x"), "error"),
        (UpstreamConnectError("x"), "connect_error"),
        (UpstreamTimeout("x"), "timeout"),
        (UpstreamStatusError("x", 503), "http_5xx"),
        (UpstreamRateLimited("x", 1.0), "http_429"),
        (UpstreamProtocolError("x"), "bad_response"),
    ],
)
def test_upstream_outcomes(err: UpstreamError, outcome: str) -> None:
    assert err.outcome == outcome


def test_upstream_status_and_cooldown_are_kept() -> None:
    assert UpstreamStatusError("x", 503).upstream_status == 503
    limited = UpstreamRateLimited("slow down", 7.5)
    assert (limited.upstream_status, limited.cooldown_s) == (429, 7.5)


def test_provider_client_error_keeps_the_providers_status() -> None:
    err = ProviderClientError(409, "conflict", "fast")
    assert (err.status, err.provider) == (409, "fast")
    assert ProviderClientError.status == 400  # the instance's status did not leak to the class


# --- headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after_s", "header"),
    [
        (0.0, "1"),
        (-3.0, "1"),
        (0.001, "1"),
        (0.5, "1"),
        (1.0, "1"),
        (1.01, "2"),
        (1.5, "2"),
        (2.0, "2"),
        (2.2, "3"),
        (59.9, "60"),
    ],
)
def test_saturated_retry_after_is_rounded_up_and_at_least_1(
    retry_after_s: float, header: str
) -> None:
    err = Saturated("every target is full", retry_after_s)
    assert err.headers() == {"Retry-After": header}
    assert err.retry_after_s == retry_after_s


def test_retry_after_rounds_up_tiny_fractions() -> None:
    assert Saturated("full", 1.0004).headers() == {"Retry-After": "2"}


@pytest.mark.parametrize(
    ("retry_after_s", "headers"),
    [
        (0.0, {}),
        (0.2, {"Retry-After": "1"}),
        (3.0, {"Retry-After": "3"}),
        (3.5, {"Retry-After": "4"}),
    ],
)
def test_all_attempts_failed_sends_retry_after_only_when_known(
    retry_after_s: float, headers: dict[str, str]
) -> None:
    assert AllAttemptsFailed(ATTEMPTS, 429, retry_after_s).headers() == headers


@pytest.mark.parametrize(
    "err",
    [BadRequest("x"), Unauthorized("x"), StoreError("x"), UpstreamTimeout("x"), RouterError()],
)
def test_other_errors_add_no_headers(err: RouterError) -> None:
    assert err.headers() == {}


# --- all attempts failed ---------------------------------------------------------------


def test_all_attempts_failed_names_each_attempt_and_its_outcome() -> None:
    err = AllAttemptsFailed(ATTEMPTS, 504)
    assert str(err) == (
        "every attempt failed: fast: timeout (read timed out after 2.0s); "
        "slow: http_5xx (503 Service Unavailable)"
    )
    assert err.attempts == ATTEMPTS
    assert to_openai_error(err)["error"]["message"] == str(err)


def test_all_attempts_failed_message_can_be_replaced() -> None:
    err = AllAttemptsFailed([], 503, message="no target is usable")
    assert str(err) == "no target is usable"
    assert err.status == 503


def test_all_attempts_failed_type_is_per_instance() -> None:
    AllAttemptsFailed(ATTEMPTS, 429)
    assert AllAttemptsFailed(ATTEMPTS, 502).type == "server_error"
    assert AllAttemptsFailed.type == "server_error"
