#!/usr/bin/env python3
"""Turns bench/run.sh's JSON lines into docs/benchmarks.md: medians over the
repeats, ratios against the direct connection of the same run, burst
exactness, the configs and the machine."""

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

TARGETS = ["direct", "wsgate", "wsgate_via_pingora", "pingora", "nginx", "haproxy"]

# The figures the performance issue quotes (2 cores, loopback, ratios vs direct).
REFERENCE = """| proxy | RSS per idle stream | upgrades/s vs direct | 64 B msgs/s vs direct | 16 KiB msgs/s vs direct |
| --- | --- | --- | --- | --- |
| nginx 1.22 limit_conn | 18.2 KB | 0.69 | 0.65 | 0.32 |
| HAProxy 2.6 stick-table conn_cur | 4.75 KB | 0.58 | 0.71 | 0.46 |
| bare Pingora 0.9 | about 59 KB | | | |
"""


def load(path):
    runs = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            runs[(r["target"], r["case"])].append(r)
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def ratio(v, base):
    if v is None or not base:
        return "–"
    return f"{v / base:.2f}"


def micro_table(path):
    """Criterion's output: each benchmark's name, then its time interval."""
    text = Path(path).read_text()
    names = re.findall(r"((?:admit_drop|admit_drop_contended|route|identify)/[a-z_0-9/]+)", text)
    times = re.findall(r"time:\s*\[[\d.]+ \S+ ([\d.]+ \S+) [\d.]+ \S+\]", text)
    rows = "\n".join(f"| `{n}` | {t} |" for n, t in zip(names, times))
    return (
        "| benchmark | median time per operation |\n| --- | --- |\n"
        + rows
        + "\n\n`cargo bench --bench admission -- --warm-up-time 0.5 --measurement-time 1.5`:"
        " admit and drop of one permit holding every scope (route total, key, client,"
        " global client) at 1, 1,000 and 100,000 tracked keys; `new_key` inserts and"
        " removes each key, `known_key` only counts; `admit_drop_contended` is per"
        " operation of each thread, all threads on one route, 1,000 keys tracked.\n"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("out")
    ap.add_argument("--machine", default="")
    ap.add_argument("--elapsed", default="")
    ap.add_argument("--params", default="")
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--micro", default="", help="a file of Criterion output")
    args = ap.parse_args()
    runs = load(args.results)

    def med(target, case, get):
        return median([get(r) for r in runs.get((target, case), [])])

    direct = {
        "rate": med("direct", "rate", lambda r: r["upgrades_per_second"]),
        "echo64": med("direct", "echo64", lambda r: r["msgs_per_second"]),
        "echo16k": med("direct", "echo16k", lambda r: r["msgs_per_second"]),
    }
    repeats = max((len(v) for v in runs.values()), default=0)
    held = med("direct", "hold", lambda r: r["n"])
    rate_conc = med("direct", "rate", lambda r: r["concurrency"])
    echo_conns = med("direct", "echo64", lambda r: r["connections"])

    rows = []
    for t in TARGETS:
        per_stream = med(t, "hold", lambda r: r["rss_bytes_per_stream"])
        back = med(t, "hold", lambda r: r["after_close_vs_baseline"])
        held_ok = med(t, "hold", lambda r: r["tally"]["upgraded"])
        rate = med(t, "rate", lambda r: r["upgrades_per_second"])
        e64 = med(t, "echo64", lambda r: r["msgs_per_second"])
        p64 = med(t, "echo64", lambda r: r["latency_us"]["p99"])
        e16 = med(t, "echo16k", lambda r: r["msgs_per_second"])
        p16 = med(t, "echo16k", lambda r: r["latency_us"]["p99"])
        burst_r = [r["tally"]["upgraded"] for r in runs.get((t, "burst_route"), [])]
        burst_c = [r["tally"]["upgraded"] for r in runs.get((t, "burst_client"), [])]
        rows.append(
            "| "
            + " | ".join(
                [
                    t,
                    fmt(held_ok),
                    fmt(per_stream / 1000, 1) if per_stream is not None else "–",
                    fmt(back, 2),
                    f"{fmt(rate)} ({ratio(rate, direct['rate'])})",
                    f"{fmt(e64)} ({ratio(e64, direct['echo64'])})",
                    fmt(p64),
                    f"{fmt(e16)} ({ratio(e16, direct['echo16k'])})",
                    fmt(p16),
                    " ".join(map(str, burst_r)) or "–",
                    " ".join(map(str, burst_c)) or "–",
                ]
            )
            + " |"
        )

    configs = []
    for item in args.config:
        name, path = item.split("=", 1)
        lang = "yaml" if name.endswith(".yaml") else ("nginx" if "nginx" in name else "")
        configs.append(f"### {name}\n\n```{lang}\n{Path(path).read_text().rstrip()}\n```\n")

    analysis = Path(__file__).with_name("analysis.md")
    analysis_text = analysis.read_text() if analysis.exists() else ""
    micro = f"## Microbenchmarks\n\n{micro_table(args.micro)}\n" if args.micro else ""

    doc = f"""# wsgate benchmarks

Generated by `bench/run.sh` (do not edit by hand; hand-written notes live in
`bench/analysis.md` and are included below). One run, {repeats} repeats,
targets interleaved in every repeat, each proxy started fresh per repeat;
medians over the repeats, ratios against the direct connection of the same
run. Run parameters: `{args.params}`; the runs took {args.elapsed} s.

## Results

| target | streams held | RSS per idle held stream (KB) | RSS after close / baseline | upgrades/s (vs direct) | 64 B msgs/s (vs direct) | 64 B p99 (µs) | 16 KiB msgs/s (vs direct) | 16 KiB p99 (µs) | burst {fmt(med('direct', 'burst_route', lambda r: r['n']))} → limit 100: 101s per repeat | burst 50 from one client → limit 10: 101s per repeat |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

- **RSS per idle held stream**: (summed VmRSS of the proxy's processes with
  {fmt(held)} streams held for the hold time, minus before opening them) / streams
  held, from `/proc/PID/status`; nginx counts its master and both workers. For
  `direct` it is the echo upstream's own growth (the client side of nothing),
  shown for scale. KB = 1,000 bytes.
- **RSS after close / baseline**: RSS 2 s after every held stream closed,
  over the RSS before they opened. Every target first opens, holds and
  closes a warm-up of 1,000 streams (`WARM`), unrecorded, so the baseline
  includes what the first streams page in or start for good (code, worker
  pools) and the ratio shows memory kept by the streams themselves.
- **upgrades/s**: upgrade then close, {fmt(rate_conc)} tasks at once, for the rate time.
- **msgs/s**: {fmt(echo_conns)} connections, each sending one binary message and waiting
  for its echo before the next; p99 is of those round trips.
- **burst**: every TCP connection is opened first, then all upgrade requests
  are sent together and every admitted stream is held until all have their
  answer. Exact is 100 and 10 for every proxy; `direct` and `pingora` have
  no limit.
- **wsgate_via_pingora**: wsgate with `server.own_handshake: false`, so
  every upgrade goes through Pingora's HTTP proxy instead of the front
  door's own handshake; otherwise the same binary and config.
- **pingora**: `examples/bare_pingora.rs`, Pingora 0.9's HTTP proxy with its
  defaults, one upstream and nothing of wsgate's (no limits, no relay of its
  own): what Pingora itself costs, the floor wsgate started from.

### Reference figures (from the performance issue)

{REFERENCE}
{micro}
{analysis_text}
## How to reproduce

```sh
bench/run.sh                          # as root on Debian 12; installs nginx and haproxy
HELD=9900 REPEATS=5 bench/run.sh      # larger runs (see the fd note in the analysis)
cargo bench --bench admission         # the microbenchmarks alone
bench/costs.sh                        # CPU time, context switches and system calls per upgrade and per message
BASE=8326c42 bench/costs.sh           # the same, with wsgate built at another revision beside the current tree
```

Each load step is one call of the project's load tool, for example:

```sh
wsload hold  ws://127.0.0.1:PORT/ws -n 4900 --hold 3s --pids PID[,PID...]
wsload rate  ws://127.0.0.1:PORT/ws -c 32 --duration 5s
wsload echo  ws://127.0.0.1:PORT/ws -c 50 --size 64 --duration 5s
wsload echo  ws://127.0.0.1:PORT/ws -c 50 --size 16384 --duration 5s
wsload burst ws://127.0.0.1:PORT/burst -n 300 --per-source 10
wsload burst ws://127.0.0.1:PORT/burst -n 50 --per-source 50
```

(`target/release/examples/wsload`, built by `cargo build --release --example
wsload`.) Clients come from loopback sources `127.1.0.1` upwards, 10 streams per
source unless `--per-source` says otherwise, so per-client limits of 10 admit
every held stream. The upstream is `examples/echo_upstream.rs` (tokio-tungstenite).

## Configs

Ports are picked at run time; every proxy has 2 workers (threads or processes).

{chr(10).join(configs)}
## Machine

```
{args.machine}
```
"""
    Path(args.out).write_text(doc)


if __name__ == "__main__":
    main()
