#!/usr/bin/env bash
# Interleaved A/B of wsgate builds, with nginx beside them: in each round,
# one `wsload rate` (upgrade then close) or `wsload echo` run per target in
# turn, all in front of one echo upstream, so that the machine's drift
# falls on every target alike. For each run it prints the rate and the
# proxy's own CPU time per upgrade or message (user and system, summed over
# its threads from /proc); then the medians. For a change too small for
# `bench/costs.sh`, which measures one target after another.
#
# Usage: bench/ab.sh BINARY [BINARY...]   e.g. two copies of target/release/wsgate
# Knobs: LOAD=rate|echo ROUNDS=5 SECS=4s CONC=32 (rate) ECHO_CONNS=50 SIZE=64 (echo)
#        THREADS=2 (wsgate threads and nginx workers) WITH_NGINX=1 (0: wsgate builds only)
#        EXTRA=<more lines of wsgate's server: section>
set -euo pipefail

LOAD=${LOAD:-rate}
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-4s}
CONC=${CONC:-32}
ECHO_CONNS=${ECHO_CONNS:-50}
SIZE=${SIZE:-64}
THREADS=${THREADS:-2}
WITH_NGINX=${WITH_NGINX:-1}
[ $# -ge 1 ] || { echo "usage: bench/ab.sh BINARY [BINARY...]" >&2; exit 2; }
# Named as given, before the directory changes below.
BINARIES=()
for binary in "$@"; do BINARIES+=("$(realpath "$binary")"); done
case $LOAD in rate | echo) ;; *) echo "LOAD must be rate or echo" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-$(pwd)/target}
WORK=$(mktemp -d /tmp/wsgate-ab.XXXXXX)
STARTED=()

log() { echo "[ab $(date +%T)] $*" >&2; }
. bench/lib.sh

cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do stop_pid "$pid"; done
    return 0
}
trap cleanup EXIT

if [ "$WITH_NGINX" = 1 ] && ! command -v nginx >/dev/null; then
    log "installing nginx from Debian's packages"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >&2
fi
command -v jq >/dev/null || { log "jq is required"; exit 1; }
cargo build --release --example wsload --example echo_upstream >&2
WSLOAD=$TARGET_DIR/release/examples/wsload
TICK=$(getconf CLK_TCK)

UP=$(free_port)
"$TARGET_DIR/release/examples/echo_upstream" "127.0.0.1:$UP" >"$WORK/echo.log" 2>&1 &
STARTED+=($!)
wait_port "$UP"

# Targets in the order they run in each round: PORT and PIDS by name.
declare -A PORT PIDS
NAMES=()
i=0
for binary in "${BINARIES[@]}"; do
    i=$((i + 1))
    name="w$i"
    PORT[$name]=$(free_port)
    write_wsgate_config "$WORK/$name.yaml" "${PORT[$name]}" "$(free_port)" "$UP" "${EXTRA:-}" \
        "$THREADS"
    WSGATE_LOG=warn "$binary" --config "$WORK/$name.yaml" >"$WORK/$name.log" 2>&1 &
    PIDS[$name]=$!
    STARTED+=($!)
    NAMES+=("$name")
    log "$name: $binary"
done
if [ "$WITH_NGINX" = 1 ]; then
    PORT[nginx]=$(free_port)
    write_nginx_config "$WORK" "${PORT[nginx]}" "$UP" "$THREADS"
    start_nginx "$WORK" "$WORK/nginx.log"
    STARTED+=("$NGINX_PID")
    NAMES+=(nginx)
fi
for name in "${NAMES[@]}"; do wait_port "${PORT[$name]}"; done
if [ "$WITH_NGINX" = 1 ]; then
    # Its workers are forked after it listens: wait for them, up to 5 s.
    for _ in $(seq 50); do
        PIDS[nginx]=$(pid_tree "$NGINX_PID")
        [ "$(tr -cd , <<<"${PIDS[nginx]}" | wc -c)" -ge "$THREADS" ] && break
        sleep 0.1
    done
fi

case $LOAD in
    rate) args=(rate -c "$CONC"); count=.tally.upgraded; rate=.upgrades_per_second ;;
    echo) args=(echo -c "$ECHO_CONNS" --size "$SIZE"); count=.messages; rate=.msgs_per_second ;;
esac

echo "target run per_second cpu_us p99_us"
for round in $(seq "$ROUNDS"); do
    for name in "${NAMES[@]}"; do
        read -r u0 s0 _ < <(usage_of "${PIDS[$name]}")
        out=$("$WSLOAD" "${args[0]}" "ws://127.0.0.1:${PORT[$name]}/ws" "${args[@]:1}" \
            --duration "$SECS")
        read -r u1 s1 _ < <(usage_of "${PIDS[$name]}")
        jq -r --arg t "$name" --argjson r "$round" --argjson cpu "$((u1 + s1 - u0 - s0))" \
            --argjson tick "$TICK" \
            "[\$t, \$r, ($rate | floor), (\$cpu * 1e6 / \$tick / $count * 10 | round / 10),
              (.latency_us.p99 // \"\")] | @tsv" <<<"$out" | tee -a "$WORK/runs.tsv"
    done
done

echo
echo "medians of $ROUNDS rounds ($LOAD):"
python3 - "$WORK/runs.tsv" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    runs[f[0]].append(f)
for name, rows in runs.items():
    med = lambda i: statistics.median(float(r[i]) for r in rows if r[i] != "")
    p99 = f", p99 {med(4):,.0f} µs" if rows[0][4] != "" else ""
    print(f"{name}: {med(2):,.0f} a second, {med(3):.1f} µs of proxy CPU each{p99}")
PY
log "work files in $WORK"
