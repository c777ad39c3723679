"""Which requests may be retried, and which outcomes are failures."""

from __future__ import annotations

import pytest

from meshd.balance.retry import (
    IDEMPOTENT_METHODS,
    MAX_REPLAY_BODY,
    Refusal,
    RetryPolicy,
    is_failure,
    is_retryable,
    refusal,
    should_retry,
)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
def test_idempotent_methods_are_retryable(method: str) -> None:
    assert is_retryable(method, False, 0, True, False)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "get", "PROPFIND"])
def test_other_methods_are_not_unless_the_route_says_so(method: str) -> None:
    assert refusal(method, False, 0, True, False) is Refusal.NOT_IDEMPOTENT
    assert is_retryable(method, True, 0, True, False)


def test_the_rfc_9110_set() -> None:
    assert IDEMPOTENT_METHODS == {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}


def test_bodies_up_to_64_kib_fully_buffered() -> None:
    assert MAX_REPLAY_BODY == 65536
    assert is_retryable("PUT", False, 65536, True, False)
    assert refusal("PUT", False, 65537, True, False) is Refusal.BODY_TOO_LARGE
    assert refusal("PUT", False, 100, False, False) is Refusal.BODY_NOT_BUFFERED
    assert refusal("PUT", False, 70_000, False, False) is Refusal.BODY_TOO_LARGE
    assert is_retryable("PUT", False, 1000, True, False, max_body=1000)


def test_never_after_response_bytes_reached_the_client() -> None:
    assert refusal("GET", False, 0, True, True) is Refusal.RESPONSE_STARTED
    assert not is_retryable("GET", True, 0, True, True)


def test_failures_are_no_response_or_5xx_by_default() -> None:
    assert is_failure(None)
    assert is_failure(500) and is_failure(503) and is_failure(599)
    assert not is_failure(200) and not is_failure(404) and not is_failure(429)
    assert is_failure(429, failure_statuses={429, 503})
    assert not is_failure(500, failure_statuses={503})


def test_should_retry_combines_limit_outcome_and_replayability() -> None:
    p = RetryPolicy()
    assert should_retry(p, 0, "GET", 0, True, False, 503)
    assert should_retry(p, 0, "GET", 0, True, False, None)      # connect error, reset
    assert not should_retry(p, 1, "GET", 0, True, False, 503)   # limit 1
    assert not should_retry(p, 0, "GET", 0, True, False, 404)   # not a failure
    assert not should_retry(p, 0, "POST", 0, True, False, 503)
    assert should_retry(RetryPolicy(route_marked=True), 0, "POST", 10, True, False, 503)
    assert not should_retry(p, 0, "GET", 0, True, True, 503)    # client saw bytes
    assert should_retry(RetryPolicy(max_retries=2, failure_statuses=frozenset({429})),
                        1, "GET", 0, True, False, 429)
