"""Choosing one endpoint of a service: power of two choices, and the alternatives.

- ``pick``: power of two choices (Mitzenmacher, "The Power of Two Choices in Randomized
  Load Balancing", 2001), as Finagle's P2C balancer and linkerd2-proxy (tower's
  ``balance::p2c``) apply it: draw two distinct endpoints at random, send to the cheaper.
  The cost comes from ``ewma.cost``; the caller passes it as a function of the index so
  that only the two drawn endpoints are costed. Weights divide the cost (an endpoint of
  weight 2 looks half as loaded), the way Envoy's least-request balancer folds weights
  into active-request counts; weight 0 is never chosen.
- ``RoundRobin``: nginx's smooth weighted round robin (``ngx_http_upstream_get_peer``):
  weights 5, 1, 1 give ``a a b a c a a``, spreading the light endpoints out.
- ``ConsistentHash``: a hash ring with virtual nodes keyed by endpoint address (Karger et
  al. 1997, as libketama and Envoy's ``ring_hash`` do it): adding or removing an endpoint
  moves only the keys that land on it.

Ejected endpoints are skipped unless more than ``max_ejected_fraction`` (default half) of
the usable endpoints are ejected: then the balancer is in panic mode and uses them all,
like Envoy's healthy panic threshold, since an outage of most of a service is more often
a problem on the caller's side than on every endpoint's.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from meshd.errors import NoEndpoints

MAX_EJECTED_FRACTION = 0.5
VNODES = 160            # ring points per unit of weight (libketama uses 160 per server)
MAX_RING_POINTS = 1 << 20


class CandidateLike(Protocol):
    @property
    def weight(self) -> float: ...

    @property
    def ejected(self) -> bool: ...


class Candidate(NamedTuple):
    """What a balancer needs to know of an endpoint besides its cost."""

    weight: float = 1.0
    ejected: bool = False


def in_panic(candidates: Sequence[CandidateLike],
             max_ejected_fraction: float = MAX_EJECTED_FRACTION) -> bool:
    """More than ``max_ejected_fraction`` of the endpoints with weight > 0 are ejected."""
    usable = [c for c in candidates if c.weight > 0]
    ejected = sum(1 for c in usable if c.ejected)
    return ejected > max_ejected_fraction * len(usable)


def eligible(candidates: Sequence[CandidateLike],
             max_ejected_fraction: float = MAX_EJECTED_FRACTION) -> list[int]:
    """Indexes a balancer may choose: weight > 0, and not ejected unless in panic mode."""
    usable = [i for i, c in enumerate(candidates) if c.weight > 0]
    healthy = [i for i in usable if not candidates[i].ejected]
    if len(usable) - len(healthy) > max_ejected_fraction * len(usable):
        return usable
    return healthy


def pick(candidates: Sequence[CandidateLike], cost_fn: Callable[[int], float],
         rng: random.Random,
         max_ejected_fraction: float = MAX_EJECTED_FRACTION) -> int:
    """Power of two choices: the index of the cheaper (cost / weight) of two distinct
    eligible endpoints drawn uniformly. Raises ``NoEndpoints`` when none is eligible."""
    idx = eligible(candidates, max_ejected_fraction)
    if not idx:
        raise NoEndpoints("no endpoint with a weight above 0")
    if len(idx) == 1:
        return idx[0]
    a, b = rng.sample(idx, 2)
    cost_a = cost_fn(a) / candidates[a].weight
    cost_b = cost_fn(b) / candidates[b].weight
    return a if cost_a <= cost_b else b  # the draw order is random, so ties are fair


def draw2(rng: random.Random, n: int) -> tuple[int, int]:
    """Two distinct positions in ``range(n)`` (n >= 2), drawn as ``rng.sample(seq, 2)``
    draws them, without its copy of the population (O(n) per call for n <= 21): the same
    random numbers give the same pair, so ``pick_among`` picks what ``pick`` would.
    CPython's ``sample`` for k = 2: a pool swap up to 21 items, rejection above."""
    randbelow = rng._randbelow  # type: ignore[attr-defined]  # what sample itself calls
    a = randbelow(n)
    if n <= 21:
        b = randbelow(n - 1)
        return a, (n - 1 if b == a else b)
    b = randbelow(n)
    while b == a:
        b = randbelow(n)
    return a, b


def pick_among(usable: Sequence[int], weights: Sequence[float],
               cost_fn: Callable[[int], float], rng: random.Random) -> int:
    """``pick`` when no endpoint is ejected: ``usable`` are the indexes of weight > 0
    (what ``eligible`` returns then), computed once per endpoint set by the caller."""
    n = len(usable)
    if n < 2:
        if not n:
            raise NoEndpoints("no endpoint with a weight above 0")
        return usable[0]
    ja, jb = draw2(rng, n)
    a, b = usable[ja], usable[jb]
    cost_a = cost_fn(a) / weights[a]
    cost_b = cost_fn(b) / weights[b]
    return a if cost_a <= cost_b else b


class RoundRobin:
    """Smooth weighted round robin for one service (per process; no shared state).

    Each pick adds every eligible endpoint's weight to its running score, chooses the
    highest score and takes the total weight off it. The scores restart when the number
    of candidates changes (a new snapshot); ejected endpoints neither score nor lose score.
    """

    def __init__(self) -> None:
        self._score: list[float] = []

    def reset(self) -> None:
        self._score = []

    def pick(self, candidates: Sequence[CandidateLike],
             max_ejected_fraction: float = MAX_EJECTED_FRACTION) -> int:
        idx = eligible(candidates, max_ejected_fraction)
        if not idx:
            raise NoEndpoints("no endpoint with a weight above 0")
        if len(self._score) != len(candidates):
            self._score = [0.0] * len(candidates)
        score = self._score
        total = 0.0
        best = idx[0]
        for i in idx:
            score[i] += candidates[i].weight
            total += candidates[i].weight
            if score[i] > score[best]:
                best = i
        score[best] -= total
        return best


def ring_hash(data: bytes) -> int:
    """64-bit ring position (BLAKE2b: stable across processes and Python versions,
    unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHash:
    """A hash ring over a service's endpoints, built once per snapshot.

    ``addresses[i]`` names endpoint ``i`` (e.g. ``"10.0.0.5:8080"``); its points depend
    only on its address and weight, never on the other endpoints, which is what keeps
    movement minimal. Weights are relative integers: ``VNODES x weight`` points each.
    """

    def __init__(self, addresses: Sequence[str], weights: Sequence[float] | None = None,
                 vnodes: int = VNODES) -> None:
        if weights is not None and len(weights) != len(addresses):
            raise ValueError("one weight per address")
        points: list[tuple[int, int]] = []
        for i, address in enumerate(addresses):
            weight = 1.0 if weights is None else weights[i]
            n = round(vnodes * weight) if weight > 0 else 0
            if weight > 0:
                n = max(n, 1)
            key = address.encode()
            points.extend((ring_hash(b"%s-%d" % (key, v)), i) for v in range(n))
            if len(points) > MAX_RING_POINTS:
                raise ValueError(f"ring larger than {MAX_RING_POINTS} points: lower the weights")
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [i for _, i in points]
        self.size = len(addresses)

    def __len__(self) -> int:
        return len(self._hashes)

    def pick(self, key: bytes,
             candidates: Sequence[CandidateLike] | None = None,
             max_ejected_fraction: float = MAX_EJECTED_FRACTION) -> int:
        """The endpoint owning ``key`` (a header value, a client address): the first
        point clockwise from the key's hash whose endpoint is eligible. With
        ``candidates`` (same order as ``addresses``), ejected endpoints are skipped
        (unless in panic mode) and their keys go to the next endpoint on the ring."""
        if not self._hashes:
            raise NoEndpoints("no endpoint with a weight above 0")
        start = bisect.bisect_right(self._hashes, ring_hash(key))
        n = len(self._hashes)
        if candidates is None:
            return self._owners[start % n]
        allowed = set(eligible(candidates, max_ejected_fraction))
        if not allowed:
            raise NoEndpoints("no endpoint with a weight above 0")
        for k in range(start, start + n):
            owner = self._owners[k % n]
            if owner in allowed:
                return owner
        raise NoEndpoints("no eligible endpoint on the ring")
