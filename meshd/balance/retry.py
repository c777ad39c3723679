"""Which requests may be retried at all, and which outcomes count as failures.

A retry sends the same request again, to another endpoint. That is only safe when:

- the method is idempotent (RFC 9110 section 9.2.2: the safe methods GET, HEAD, OPTIONS
  and TRACE, plus PUT and DELETE), or the route's config marks the request retryable
  (say, a POST the operator knows to be idempotent);
- the whole request body is buffered for replay and is at most 64 KiB (Linkerd2's limit;
  a bigger or still-streaming body has been partly consumed and cannot be sent twice);
- no byte of the response has reached the client: after that, the client has seen an
  answer and a second one cannot replace it.

Whether a retry then goes is also up to the budget (``budget``) and the retry limit (one
by default, as Linkerd's). Method names are case-sensitive (RFC 9110 section 9.1): "get"
is not GET.

``attempt_refusal`` is the rule the worker's attempt loop asks
(``meshd.worker.call.may_retry``, then the deadline and the shared budget): it speaks the
data path's failure kinds (connect, reset, timeout, 5xx, 4xx, grpc: a non-zero
grpc-status; a service's ``failure_on`` says which count; of gRPC failures only a
trailers-only answer in ``meshd.proto.grpc_status.RETRYABLE`` is asked about) and adds
the cases the request-level rule cannot see, where the upstream certainly did not process
the request, which may then go elsewhere whatever its method: its bytes never left meshd
("connect": the connection failed; "unsent": the write of its first bytes failed, counted
as a connect failure), or an HTTP/2 peer refused its stream ("refused": REFUSED_STREAM, or
beyond a GOAWAY's last stream id, RFC 9113 §8.7; always retried, never counted as a
failure), provided its body can be sent again in full.

What counts as a failure, for failure accrual and retries alike (the issue's default):
no response (connect error, reset, timeout) or a 5xx status; a service may configure its
own set of failing statuses.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
MAX_REPLAY_BODY = 64 * 1024   # bytes
MAX_RETRIES = 1               # retries per request (DESIGN section 6)


class Refusal(enum.Enum):
    """Why a request may not be retried (for logs and metrics labels)."""

    NO_ATTEMPTS_LEFT = "no_attempts_left"
    NOT_A_FAILURE = "not_a_failure"
    NOT_IDEMPOTENT = "not_idempotent"
    BODY_TOO_LARGE = "body_too_large"
    BODY_NOT_BUFFERED = "body_not_buffered"
    RESPONSE_STARTED = "response_started"


def refusal(method: str, route_marked: bool, body_len: int, body_complete: bool,
            response_started: bool, max_body: int = MAX_REPLAY_BODY) -> Refusal | None:
    """None when the request may be retried, else the first reason it may not.

    ``body_len``: bytes of request body buffered; ``body_complete``: the whole body is in
    that buffer (a request without a body is complete with length 0)."""
    if response_started:
        return Refusal.RESPONSE_STARTED
    if not route_marked and method not in IDEMPOTENT_METHODS:
        return Refusal.NOT_IDEMPOTENT
    if body_len > max_body:
        return Refusal.BODY_TOO_LARGE
    if not body_complete:
        return Refusal.BODY_NOT_BUFFERED
    return None


def attempt_refusal(kind: str, failure_on: Collection[str], attempts_left: bool,
                    replay: bool, body_replayable: bool) -> Refusal | None:
    """None when an attempt that failed with ``kind`` (before any response byte reached
    the client) may be sent to another endpoint, else why not. ``replay``: the method is
    idempotent or the route marks the request retryable; ``body_replayable``: the body
    (if any) can still be sent again in full (kept, or not read yet)."""
    if not attempts_left:
        return Refusal.NO_ATTEMPTS_LEFT
    if kind == "refused" or (kind == "unsent" and "connect" in failure_on):
        # never processed: any method, if the body (some of it sent) can go again
        return None if body_replayable else Refusal.BODY_NOT_BUFFERED
    if kind not in failure_on:
        return Refusal.NOT_A_FAILURE
    if kind == "connect":
        return None  # nothing of the request left meshd
    if not replay:
        return Refusal.NOT_IDEMPOTENT
    if not body_replayable:
        return Refusal.BODY_NOT_BUFFERED
    return None


def is_retryable(method: str, route_marked: bool, body_len: int, body_complete: bool,
                 response_started: bool, max_body: int = MAX_REPLAY_BODY) -> bool:
    """May this request be sent again to another endpoint?"""
    return refusal(method, route_marked, body_len, body_complete, response_started,
                   max_body) is None


def is_failure(status: int | None, failure_statuses: Collection[int] | None = None) -> bool:
    """An outcome is a failure: no response at all (``status`` None: connect error,
    reset, timeout), or a failing status (5xx unless the service lists its own)."""
    if status is None:
        return True
    if failure_statuses is None:
        return 500 <= status <= 599
    return status in failure_statuses


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A route's or service's retry settings, from config (validated there)."""

    max_retries: int = MAX_RETRIES
    max_body: int = MAX_REPLAY_BODY
    route_marked: bool = False
    failure_statuses: frozenset[int] | None = None   # None: 5xx


def should_retry(policy: RetryPolicy, retries_done: int, method: str, body_len: int,
                 body_complete: bool, response_started: bool, status: int | None) -> bool:
    """Everything but the budget: the outcome failed, the limit is not reached, and the
    request may be replayed. The caller then asks the (shared) budget and waits
    ``budget.backoff(retries_done + 1, rng)`` before sending to another endpoint."""
    return (retries_done < policy.max_retries
            and is_failure(status, policy.failure_statuses)
            and is_retryable(method, policy.route_marked, body_len, body_complete,
                             response_started, policy.max_body))
