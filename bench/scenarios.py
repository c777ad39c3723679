"""The five scenarios: http1, balancing, slow-endpoint, h2, two-hop."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench.common import (
    AIM,
    BALANCING,
    BALANCING_AIM,
    H2_AIM,
    HOP_AIM_MS,
    MTLS_AIM_CPU,
    MTLS_AIM_P50_MS,
    MTLS_AIM_P99_MS,
    POLICIES,
    SLOW_MS,
    SLOW_VARIANTS,
    BenchError,
    Round,
)
from bench.load import RateRound, check_h2, measure_h2, measure_rate, shown_command, shown_h2load
from bench.mtls import new_connections, start_pair
from bench.procs import (
    Nginx,
    SlowBackend,
    balancing_nginx,
    check_answers,
    ensure_tools,
    own_ticks,
    proxy_nginx,
    start_meshd,
)
from bench.report import (
    Ports,
    _cpu,
    _header,
    _ratio,
    _rounds_json,
    _save,
    _table,
    _warnings,
    median_rounds,
    rate_problems,
    ratio_aim,
    rps_ratios,
    run_rounds,
    wrk_problems,
    wrk_rounds,
)
from meshd.testing.harness import Meshd, free_port, wait_for

# -- the scenarios ----------------------------------------------------------------------------

def scenario_http1(targets: list[str], backend_port: int, workdir: Path,
                   args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    load = os.getloadavg()[0]
    ports: Ports = {}
    for name in targets:
        port = free_port()
        if name == "direct":
            ports[name] = (backend_port, None)
            continue
        if name == "nginx":
            proc: Nginx | Meshd = proxy_nginx(workdir, port, backend_port).start()
        else:
            proc = start_meshd(workdir, int(name[6]), port, backend_port)
        stack.callback(proc.stop)
        ports[name] = (port, proc.pid)
        if args.tap and isinstance(proc, Meshd):
            twin = f"{name}+tap"
            port = free_port()
            tapped = start_meshd(workdir, int(name[6]), port, backend_port,
                                 name=f"{name[6:]}-tap")
            stack.callback(tapped.stop)
            stack.callback(attach_tap(tapped, int(name[6])))
            ports[twin] = (port, tapped.pid)
    traced = _tracing_targets(targets, backend_port, workdir, args, stack, ports)
    logged = (start_twins(targets, "alog", lambda name: f'[access_log]\npath = '
                          f'"{workdir}/access-{name}.log"\nformat = "{args.access_log}"\n',
                          backend_port, workdir, stack, ports) if args.access_log else [])
    if traced or logged:  # each twin right after its plain target: measured back to back
        ports = {n: ports[n] for name in ports if "+" not in name
                 for n in (name, *(f"{name}+{s}" for s in TWINS)) if n in ports}
    rounds = wrk_rounds("", ports, args)
    results = median_rounds(rounds, lambda r: r.rps)
    command = shown_command(args.duration, args.connections)
    base = results.get("nginx")
    base_rps = base.rps if base else None
    base_cpu = base.cpu_us_per_req if base else None
    _header("HTTP/1.1 throughput: direct, nginx, meshd", command, "median by req/s of",
            args.rounds, args.duration, load)
    _table(["target", "req/s", "× nginx", "p50 ms", "p99 ms", "CPU µs/req", "× nginx CPU"],
           [[name, f"{r.rps:,.0f}", _ratio(r.rps, base_rps), f"{r.p50_ms:.2f}",
             f"{r.p99_ms:.2f}", _cpu(r), _ratio(r.cpu_us_per_req, base_cpu)]
            for name, r in results.items()])
    # nginx and meshd-2w run back to back in each round: the aim is judged per round
    pairs = (rps_ratios(rounds, "meshd-2w", "nginx")
             if "meshd-2w" in rounds and "nginx" in rounds else [])
    aim = None
    if pairs:
        lines, met = ratio_aim(pairs, "meshd-2w", "nginx", AIM)
        print(f"\n{lines}")
        aim = {"ratio": AIM, "met": met}
    tap = tap_summary(rounds) if args.tap else {}
    tracing = tracing_summary(rounds, traced, args)
    alog = twin_summary(rounds, logged, "alog", f"[access_log] format {args.access_log}, "
                        "to a file")
    _warnings(rounds, wrk_problems)
    _save("http1.json", command, args,
          results={name: asdict(r) for name, r in results.items()},
          all_rounds=_rounds_json(rounds), per_round_ratios=pairs, aim=aim, tap=tap,
          tracing=tracing or None,
          access_log={"format": args.access_log, "twins": alog} if alog else None)


def attach_tap(meshd: Meshd, workers: int) -> Callable[[], None]:
    """One tap client on ``meshd`` (curl reading admin /tap, every request: no filter),
    once every worker taps. Returns what stops it."""
    tap = subprocess.Popen(["curl", "-sN", "-o", "/dev/null", f"http://{meshd.admin}/tap"])
    try:
        wait_for(lambda: meshd.metric("meshd_tap_clients") == 1
                 and meshd.metric("meshd_tap_workers_current") == workers, timeout=30,
                 what="the tap attached")
    except TimeoutError as e:
        tap.kill()
        raise BenchError(f"tap: {e}") from None

    def stop() -> None:
        tap.terminate()
        tap.wait(10)
    return stop


def tap_summary(rounds: dict[str, list[Round]]) -> dict[str, dict[str, object]]:
    """Each tapped twin against its meshd target, round by round (measured back to back)."""
    out: dict[str, dict[str, object]] = {}
    for name in rounds:
        if not name.endswith("+tap") or name[:-4] not in rounds:
            continue
        base = name[:-4]
        ratios = rps_ratios(rounds, name, base)
        cpu = [x.cpu_us_per_req / y.cpu_us_per_req
               for x, y in zip(rounds[name], rounds[base], strict=True)
               if x.cpu_us_per_req and y.cpu_us_per_req]
        print(f"\nper-round req/s ratio {name}/{base}: {', '.join(f'{x:.3f}' for x in ratios)};"
              f" median {statistics.median(ratios):.3f}"
              + (f"; median CPU/req ratio {statistics.median(cpu):.3f}" if cpu else ""))
        out[name] = {"rps_ratios": ratios, "rps_ratio_median": statistics.median(ratios),
                     "cpu_ratio_median": statistics.median(cpu) if cpu else None}
    return out


TWINS = ("tap", "tracing", "alog")  # TARGET+twin: the same meshd with one thing on


def twin_summary(rounds: dict[str, list[Round]], paired: list[str], twin: str,
                 what: str) -> dict[str, dict[str, object]]:
    """Each TARGET+``twin`` against its plain TARGET, round by round (each pair measured
    back to back): the per-round req/s and CPU/request ratios printed (``what`` the twin
    has on) and returned."""
    out: dict[str, dict[str, object]] = {}
    for name in paired:
        ratios = rps_ratios(rounds, f"{name}+{twin}", name)
        cpu = [x.cpu_us_per_req / y.cpu_us_per_req
               for x, y in zip(rounds[f"{name}+{twin}"], rounds[name], strict=True)
               if x.cpu_us_per_req and y.cpu_us_per_req]
        out[name] = {"rps_ratios": ratios, "median": statistics.median(ratios),
                     "cpu_ratios": cpu, "cpu_median": statistics.median(cpu) if cpu else None}
        print(f"per-round req/s ratio {name}+{twin}/{name} ({what}): "
              f"{', '.join(f'{x:.3f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.3f}")
        if cpu:
            print(f"per-round CPU/req ratio {name}+{twin}/{name}: "
                  f"{', '.join(f'{x:.3f}' for x in cpu)}; median {statistics.median(cpu):.3f}")
    return out


def tracing_summary(rounds: dict[str, list[Round]], traced: list[str],
                    args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """Each traced twin against its meshd target, round by round (measured back to back)."""
    what = ("control: no [tracing] in either" if args.tracing == "control" else
            f"sample_rate {TRACE_RATE}, {args.tracing} endpoint")
    return twin_summary(rounds, traced, "tracing", what)


TRACE_RATE = 0.01


def start_twins(targets: list[str], twin: str, conf: Callable[[str], str], backend_port: int,
                workdir: Path, stack: contextlib.ExitStack, ports: Ports) -> list[str]:
    """Each meshd target again as TARGET+``twin``, with ``conf(target)`` added to its
    config; returns the meshd targets so paired."""
    paired = [name for name in targets if name.startswith("meshd-")]
    for name in paired:
        port = free_port()
        proc = start_meshd(workdir, int(name[6]), port, backend_port,
                           name=f"{name[6:]}-{twin}", extra=conf(name))
        stack.callback(proc.stop)
        ports[f"{name}+{twin}"] = (port, proc.pid)
    return paired


def _tracing_targets(targets: list[str], backend_port: int, workdir: Path,
                     args: argparse.Namespace, stack: contextlib.ExitStack,
                     ports: Ports) -> list[str]:
    """With --tracing: each meshd target again as TARGET+tracing ([tracing] at
    TRACE_RATE to a local OTLP receiver in this process, or to a port nothing listens
    on); returns the meshd targets so paired."""
    if not args.tracing:
        return []
    if args.tracing == "dead":
        endpoint = f"http://127.0.0.1:{free_port()}/v1/traces"
    else:
        from meshd.testing.otlp_receiver import OtlpReceiver
        receiver = OtlpReceiver().start()
        stack.callback(receiver.stop)
        endpoint = receiver.endpoint
    conf = f'[tracing]\notlp_endpoint = "{endpoint}"\nsample_rate = {TRACE_RATE}\n'
    if args.tracing == "control":  # an A/A pair: what the pairing alone shows
        conf = ""
    return start_twins(targets, "tracing", lambda name: conf, backend_port, workdir, stack,
                       ports)


def balancing_summary(rounds: dict[str, list[Round]]) -> dict[str, float | None]:
    """Per-round ratios p2c / rr (each pair measured back to back), their medians."""
    a, b = (rounds[n] for n in BALANCING)
    rps = rps_ratios(rounds, *BALANCING)
    p99 = [x.p99_ms / y.p99_ms for x, y in zip(a, b, strict=True)]
    cpu = [x.cpu_us_per_req / y.cpu_us_per_req for x, y in zip(a, b, strict=True)
           if x.cpu_us_per_req and y.cpu_us_per_req]
    return {"rps_ratio": statistics.median(rps), "p99_ratio": statistics.median(p99),
            "cpu_ratio": statistics.median(cpu) if cpu else None}


def scenario_balancing(backend_ports: list[int], workdir: Path, args: argparse.Namespace,
                       stack: contextlib.ExitStack) -> None:
    load = os.getloadavg()[0]
    ports: Ports = {}
    for name in BALANCING:
        port = free_port()
        meshd = start_meshd(workdir, 2, port, backend_ports, name=f"bal-{name[6:]}",
                            policy=POLICIES[name[6:]])
        stack.callback(meshd.stop)
        ports[name] = (port, meshd.pid)
    rounds = wrk_rounds("balancing: ", ports, args)
    results = median_rounds(rounds, lambda r: r.rps)
    command = shown_command(args.duration, args.connections)
    base = results["meshd-rr"]
    _header("Balancing features on (p2c, retries 1, failure_accrual 7) vs round robin "
            "(retries 0, failure_accrual 0): meshd 2 workers, 3 healthy backends",
            command, "alternated A B A B, median by req/s of", args.rounds, args.duration,
            load)
    _table(["variant", "req/s", "× rr", "p50 ms", "p99 ms", "× rr p99", "CPU µs/req", "× rr CPU"],
           [[name, f"{r.rps:,.0f}", _ratio(r.rps, base.rps), f"{r.p50_ms:.2f}",
             f"{r.p99_ms:.2f}", _ratio(r.p99_ms, base.p99_ms), _cpu(r),
             _ratio(r.cpu_us_per_req, base.cpu_us_per_req)] for name, r in results.items()])
    s = balancing_summary(rounds)
    pairs = ", ".join(f"{x:.3f}" for x in rps_ratios(rounds, *BALANCING))
    cpu_ratio = s["cpu_ratio"]
    print(f"\nper-round req/s ratio p2c/rr (back-to-back pairs): {pairs}; median "
          f"{s['rps_ratio']:.3f}; median p99 ratio {s['p99_ratio']:.2f}; median CPU/req ratio "
          + (f"{cpu_ratio:.3f}" if cpu_ratio is not None else "—"))
    rps_ratio = s["rps_ratio"] or 0.0
    met = rps_ratio >= 1 - BALANCING_AIM and (cpu_ratio is None or cpu_ratio <= 1 + BALANCING_AIM)
    print(f"aim: cost under {BALANCING_AIM:.0%}: {'met' if met else 'not met'} "
          f"(req/s {rps_ratio - 1:+.1%}, CPU per request "
          + (f"{cpu_ratio - 1:+.1%})" if cpu_ratio is not None else "—)"))
    _warnings(rounds, wrk_problems)
    _save("balancing.json", command, args, policies=POLICIES,
          per_round_median_ratios_p2c_over_rr=s, aim_cost=BALANCING_AIM,
          all_rounds=_rounds_json(rounds))


def scenario_slow(fast: dict[str, tuple[int, Path]], workdir: Path, args: argparse.Namespace,
                  stack: contextlib.ExitStack) -> None:
    load = os.getloadavg()[0]
    slow = SlowBackend(free_port(), SLOW_MS).start()
    stack.callback(slow.stop)
    backend_ports = [p for p, _ in fast.values()] + [slow.port]

    def counter() -> dict[str, int]:
        counts = {name: log.stat().st_size // 2 if log.exists() else 0
                  for name, (_, log) in fast.items()}
        counts["slow"] = slow.count()
        return counts

    ports: Ports = {}
    for name in SLOW_VARIANTS:
        port = free_port()
        proc: Nginx | Meshd
        if name.startswith("nginx-"):
            method = "least_conn" if name == "nginx-lc" else ""
            proc = balancing_nginx(f"slow-{name}", workdir, port, backend_ports, method).start()
        else:
            proc = start_meshd(workdir, 2, port, backend_ports, name=f"slow-{name[6:]}",
                               policy=POLICIES[name[6:]])
        stack.callback(proc.stop)
        ports[name] = (port, proc.pid)
    rounds = wrk_rounds("slow-endpoint: ", ports, args, args.slow_connections, counter)
    results = median_rounds(rounds, lambda r: r.p99_ms)
    command = shown_command(args.duration, args.slow_connections)
    base = results.get(SLOW_VARIANTS[0])
    _header(f"One slow endpoint (+{SLOW_MS} ms) out of three: nginx round robin / least_conn "
            "vs meshd p2c / round robin (2 workers each)", command, "median by p99 of",
            args.rounds, args.duration, load)
    _table(["variant", "req/s", "p50 ms", "p90 ms", "p99 ms", "× nginx-rr p99",
            "slow endpoint's share", "CPU µs/req"],
           [[name, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
             _ratio(r.p99_ms, base.p99_ms if base else None),
             f"{r.slow_share:.1%}" if r.slow_share is not None else "—", _cpu(r)]
            for name, r in results.items()])
    shares = {n: ", ".join(f"{r.slow_share:.1%}" for r in rs if r.slow_share is not None)
              for n, rs in rounds.items()}
    print("\nslow endpoint's share per round: "
          + "; ".join(f"{n} {s}" for n, s in shares.items()))
    _warnings(rounds, wrk_problems)
    _save("slow-endpoint.json", command, args, slow_ms=SLOW_MS, policies=POLICIES,
          all_rounds=_rounds_json(rounds))


def scenario_h2(direct_port: int, backend_port: int, workdir: Path, args: argparse.Namespace,
                stack: contextlib.ExitStack) -> None:
    ensure_tools("h2load")
    load = os.getloadavg()[0]
    ports: Ports = {"direct-h2": (direct_port, None)}
    nginx = proxy_nginx(workdir, free_port(), backend_port, h2=True).start()
    stack.callback(nginx.stop)
    ports["nginx-h2"] = (nginx.port, nginx.pid)
    port = free_port()
    meshd = start_meshd(workdir, 2, port, backend_port, name="h2")
    stack.callback(meshd.stop)
    ports["meshd-h2"] = (port, meshd.pid)
    shares: list[str] = []  # how meshd's workers shared its CPU, round by round

    def measure_one(name: str, target: tuple[int, int | None]) -> Round:
        if name != "meshd-h2":
            return measure_h2(name, *target, args, workdir)
        workers = meshd.worker_pids()
        before = own_ticks(workers)
        r = measure_h2(name, *target, args, workdir)
        used = {w: t - before.get(w, 0) for w, t in own_ticks(workers).items()}
        total = sum(used.values()) or 1
        shares.append(" / ".join(f"{u / total:.0%}" for u in used.values()))
        return r

    rounds = run_rounds("h2: ", ports, args, lambda name, t: check_h2(name, t[0]), measure_one)
    results = median_rounds(rounds, lambda r: r.rps)
    command = shown_h2load(args.duration)
    base = results["nginx-h2"]
    _header("HTTP/2 (h2c, prior knowledge), 16 connections x 10 streams: direct to an nginx h2c "
            "server, nginx h2c -> HTTP/1.1, meshd (2 workers) h2 -> HTTP/1.1",
            command, "median by req/s of", args.rounds, args.duration, load)
    _table(["target", "req/s", "× nginx", "p50 ms", "p90 ms", "p99 ms", "CPU µs/req",
            "× nginx CPU"],
           [[name, f"{r.rps:,.0f}", _ratio(r.rps, base.rps), f"{r.p50_ms:.2f}",
             f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}", _cpu(r),
             _ratio(r.cpu_us_per_req, base.cpu_us_per_req)] for name, r in results.items()])
    # the aim is judged on the ratio within each round (meshd measured right after nginx)
    pairs = rps_ratios(rounds, "meshd-h2", "nginx-h2")
    lines, met = ratio_aim(pairs, "meshd-h2", "nginx-h2", H2_AIM)
    print(f"\nlatency percentiles from h2load's per-request log (--log-file); the backend of "
          f"nginx-h2 and meshd-h2 is the HTTP/1.1 nginx backend\n{lines}\n"
          f"meshd-h2's workers' shares of its workers' CPU, per round: {'; '.join(shares)}")
    _warnings(rounds, wrk_problems)
    _save("h2.json", command, args, results={name: asdict(r) for name, r in results.items()},
          all_rounds=_rounds_json(rounds), per_round_ratios=pairs,
          aim={"ratio": H2_AIM, "met": met})


def _hop_cpu(rs: list[RateRound]) -> str:
    """The meshd processes' CPU per request, median over rounds: total (A / B)."""
    if not rs[0].cpu_us_per_req_each:
        return "—"
    parts = [statistics.median(r.cpu_us_per_req_each[i] for r in rs)
             for i in range(len(rs[0].cpu_us_per_req_each))]
    total = statistics.median(r.cpu_us_per_req or 0 for r in rs)
    return f"{total:.0f}" + (f" ({' / '.join(f'{x:.0f}' for x in parts)})" if len(parts) > 1
                             else "")


def scenario_two_hop(backend_port: int, workdir: Path, args: argparse.Namespace,
                     stack: contextlib.ExitStack) -> None:
    load = os.getloadavg()[0]
    workers = args.hop_workers
    # meshd B: the application's inbound side, HTTP/2 (or HTTP/1.1) in, HTTP/1.1 to the app
    b_port = free_port()
    b = start_meshd(workdir, workers, 0, backend_port, name="hop-b", listeners=(
        f'[[listener]]\nname = "inbound"\nlisten = "127.0.0.1:{b_port}"\n'
        f'direction = "inbound"\nprotocol = "auto"\nforward = "127.0.0.1:{backend_port}"\n\n'))
    stack.callback(b.stop)
    # meshd A: "bench" is the app's plain endpoint (one hop), "web" the same app marked
    # meshed behind B's inbound port (two hops: A -> HTTP/2 -> B -> HTTP/1.1 -> app)
    a_port = free_port()
    a = start_meshd(workdir, workers, a_port, backend_port, name="hop-a", services=(
        f'web = [{{ address = "127.0.0.1:{backend_port}", meshed = true, '
        f'inbound_port = {b_port} }}]\n'))
    stack.callback(a.stop)
    # the same two hops over mTLS: another pair with [identity] (B strict), in this run
    pair = start_pair(workdir, workers, backend_port, stack)
    targets: dict[str, tuple[int, str, list[int]]] = {
        "direct": (backend_port, "bench", []),
        "one-hop": (a_port, "bench", [a.pid]),
        "two-hop": (a_port, "web", [a.pid, b.pid]),
        "two-hop-mtls": (pair.a_port, "web", [pair.a.pid, pair.b.pid]),
    }
    rounds = run_rounds("two-hop: ", targets, args,
                        lambda name, t: check_answers(name, t[0], t[1]),
                        lambda name, t: measure_rate(name, *t, args))

    def med(name: str, key: Callable[[RateRound], float]) -> float:
        return statistics.median(key(r) for r in rounds[name])
    p50 = {n: med(n, lambda r: r.p50_ms) for n in targets}
    p99 = {n: med(n, lambda r: r.p99_ms) for n in targets}
    command = (f"open loop in bench.py: {args.rate:g} GET/s over {args.rate_connections} "
               f"keep-alive HTTP/1.1 connections, {args.rate_duration:g} s per round after a "
               f"1 s warm-up, latency from the scheduled send time")
    _header(f"Added latency of meshd hops at a fixed {args.rate:,.0f} requests/s: direct to "
            f"the app, one hop (A), two hops (A -> HTTP/2 -> B -> app), the same over mTLS "
            f"(two-hop-mtls: TLS 1.3 on the hop, B strict), {workers} worker(s) "
            f"each", command, "medians over", args.rounds, args.rate_duration, load, prompt="")
    _table(["path", "achieved req/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
            "added p50 ms", "added p99 ms", "meshd CPU µs/req (A / B)", "client CPU µs/req"],
           [[n, f"{med(n, lambda r: r.achieved):,.0f}", f"{p50[n]:.3f}",
             f"{med(n, lambda r: r.p90_ms):.3f}", f"{p99[n]:.3f}",
             f"{med(n, lambda r: r.max_ms):.3f}",
             "—" if n == "direct" else f"{p50[n] - p50['direct']:+.3f}",
             "—" if n == "direct" else f"{p99[n] - p99['direct']:+.3f}",
             _hop_cpu(rounds[n]),
             f"{med(n, lambda r: r.client_cpu_us_per_req):.0f}"]
            for n in targets])
    added = [x.p50_ms - y.p50_ms for x, y in zip(rounds["two-hop"], rounds["direct"],
                                                 strict=True)]
    added_p50 = statistics.median(added)  # judged per round, as printed
    print("\nper-round added p50 of two hops (vs direct in the same round): "
          + ", ".join(f"{x:+.3f}" for x in added)
          + f" ms\naim: two hops add under {HOP_AIM_MS:g} ms median: "
          f"{'met' if added_p50 < HOP_AIM_MS else 'not met'} ({added_p50:+.3f} ms, the median "
          f"of the per-round figures)")
    cpu = {n: med(n, lambda r: r.cpu_us_per_req or 0.0) for n in ("two-hop", "two-hop-mtls")}
    cpu_ratio = cpu["two-hop-mtls"] / cpu["two-hop"] if cpu["two-hop"] else float("nan")
    added_mtls = (p50["two-hop-mtls"] - p50["direct"], p99["two-hop-mtls"] - p99["direct"])
    fresh = new_connections(pair, args.rate_duration)
    print(f"\nmTLS on the hop (two-hop-mtls vs two-hop, same run): added p50 "
          f"{added_mtls[0]:+.3f} ms (aim < {MTLS_AIM_P50_MS:g}), added p99 "
          f"{added_mtls[1]:+.3f} ms (aim < {MTLS_AIM_P99_MS:g}); meshd CPU per request "
          f"{cpu['two-hop-mtls']:.0f} / {cpu['two-hop']:.0f} µs = {cpu_ratio:.2f}x "
          f"(aim <= {MTLS_AIM_CPU:g}x)\n"
          f"new mTLS connections to B ({workers} worker(s)), one GET each: "
          f"{fresh.per_second:,.0f}/s achieved by one openssl s_time client, B's CPU "
          f"{fresh.worker_cpu_us_per_conn:,.0f} µs per connection = "
          f"{fresh.one_worker_ceiling:,.0f}/s per fully busy worker\n  ({fresh.command})")
    _warnings(rounds, rate_problems)
    _save("two-hop.json", command, args,
          mtls={"added_p50_ms": added_mtls[0], "added_p99_ms": added_mtls[1],
                "cpu_us_per_req": cpu, "cpu_ratio": cpu_ratio,
                "aim": {"p50_ms": MTLS_AIM_P50_MS, "p99_ms": MTLS_AIM_P99_MS,
                        "cpu_ratio": MTLS_AIM_CPU},
                "new_connections": asdict(fresh) | {"command": fresh.command}},
          workers=workers, rate=args.rate, connections=args.rate_connections,
          medians={n: {"p50_ms": p50[n], "p99_ms": p99[n]} for n in targets},
          added_ms={n: {"p50": p50[n] - p50["direct"], "p99": p99[n] - p99["direct"]}
                    for n in ("one-hop", "two-hop", "two-hop-mtls")},
          all_rounds=_rounds_json(rounds),
          aim={"added_p50_ms": HOP_AIM_MS, "met": added_p50 < HOP_AIM_MS})
