"""`make bench`: meshd against nginx over HTTP/1.1 and HTTP/2, the cost of balancing, a
slow endpoint, and the latency meshd hops add, on loopback.

Five scenarios, each selectable with ``--only`` (default: all of them):

``direct``, ``nginx``, ``meshd-1w``, ``meshd-2w`` (together: ``http1``)
    An nginx backend answering ~100 bytes, the proxies under test in front of it (nginx
    with 2 workers and upstream keepalive, meshd with 1 and with 2 workers), and the
    backend directly, all driven with the same wrk command. Ratios to nginx.

``balancing``
    The cost of the balancing features: meshd (2 workers) in front of three healthy
    endpoints of one service (three ports of the one-worker nginx backend), once with the defaults (balancer = "p2c" peak-EWMA
    from shared memory, retries = 1 within the shared budget, failure_accrual = 7), once
    as the foundation balanced (balancer = "round_robin", retries = 0,
    failure_accrual = 0). Both run side by side and are alternated round by round
    (A B A B ...) so that drift hits them alike; besides the ratio of the median rounds,
    the median of the per-round ratios (each pair measured back to back) is reported.

``slow-endpoint``
    One endpoint out of three answers 50 ms late (a tiny gevent server in its own process,
    ``--serve-slow``; the two fast ones are nginx): p99 through nginx's round robin and
    least_conn (2 workers, upstream keepalive, a shared ``zone``) and through meshd with
    p2c and with round robin (the two configurations of ``balancing``), under a fixed,
    modest load (``--slow-connections``, default 16). The backends count the requests
    they serve, so each variant's share of requests sent to the slow endpoint is shown.

``h2``
    HTTP/2 with prior knowledge (h2c), ``h2load -c16 -m10`` for ``--duration`` s after a
    1 s warm-up, against three targets: ``direct-h2`` (a second server block of the nginx
    backend, ``listen ... http2``, answering BODY itself), ``nginx-h2`` (nginx, 2 workers,
    ``listen ... http2``, proxy_pass with keepalive to the HTTP/1.1 backend; the baseline)
    and ``meshd-h2`` (2 workers, h2 from the client, each stream forwarded to the same
    HTTP/1.1 backend). h2load prints only min/max/mean/sd: p50/p90/p99 come from its
    per-request log (``--log-file``). h2load (Debian's nghttp2-client) is installed by
    scripts/ensure-tools.sh when missing.

``two-hop``
    Added latency of meshd hops at a fixed rate (``--rate``, default 1,000 requests/s) of
    HTTP/1.1 GETs from an open-loop generator in this script (``--rate-connections``
    keep-alive connections, one thread each, sending at scheduled times; latency counted
    from the scheduled time, so coordinated omission is corrected), ``--rate-duration`` s
    per round after a 1 s warm-up: ``direct`` to the application (the nginx backend),
    ``one-hop`` through meshd A (service ``bench``: the plain endpoint) and ``two-hop``
    through A and B (service ``web``: the same endpoint marked meshed, so A carries the
    requests over one multiplexed HTTP/2 connection to B's inbound listener, which gives
    the application HTTP/1.1). ``two-hop-mtls``: the same two hops through a second pair
    of meshds with ``[identity]`` (the files provider, certificates from
    ``meshd.identity.ca``; B's inbound listener ``mtls = "strict"``, A's endpoint given
    B's identity), so the hop is mTLS (TLS 1.3), measured in the same rounds: the mTLS
    added latency and the ratio of the meshds' CPU per request (mTLS / plaintext). Then
    ``openssl s_time -new -tls1_3`` with a client certificate against B's port for
    ``--rate-duration`` s: fresh mTLS connections with one GET each; reported are the
    rate the one client reached and B's CPU per connection (its inverse: the connections
    one fully busy worker sustains). ``--hop-workers`` workers each (default 1). Medians
    over the rounds of each percentile; added = hop - direct.

Rounds go round-robin over a scenario's targets (each after a 1 s warm-up) so that drift
of a noisy machine hits them alike; the round with the median req/s is reported (median
p99 for ``slow-endpoint``).

Proxy CPU per request = user+sys clock ticks of the proxy's process tree (from
/proc/PID/stat) over the round, divided by the requests wrk completed.

Results go to stdout (a markdown table per scenario, with the load average before and
after it: the machine may be shared) and bench-results/http1.json, balancing.json,
slow-endpoint.json, h2.json, two-hop.json; meshd's logs to bench-results/. Exit 1 only
when a target cannot be started or wrk/h2load fails; a missed aim is just reported.
BENCH_KEEP=1 keeps the temporary directory (configs, nginx logs) for a look afterwards.

Run it as ``python -m bench`` from the repository root (``make bench`` does;
``scripts/bench.py`` is the same entry point). The modules, one concern each:
``common`` (constants, ``Round``, ``BenchError``), ``procs`` (the processes under test
and their CPU from /proc), ``mtls`` (two-hop's mTLS pair and new-connection rate), ``load`` (wrk, h2load and the open-loop generator, with their
parsers), ``report`` (rounds, medians, ratios, tables, JSON), ``scenarios`` (the five
above) and ``cli`` (options, then the selected scenarios).
"""
