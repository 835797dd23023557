#!/usr/bin/env bash
# What one upgrade and one echoed message cost each proxy: CPU time (user
# and system), context switches and system calls, under `wsload rate` and
# `wsload echo`.
#
# Targets: `wsgate`, `wsgate_via_pingora` (the same with
# `server.own_handshake: false`: every upgrade through Pingora's HTTP
# proxy), `wsgate_stealing` (the same with `server.work_stealing: true`),
# `wsgate_no_keepalive` (the same with `server.tcp_keepalive: false`, as
# nginx's config here has none), `pingora` (examples/bare_pingora.rs,
# Pingora 0.9 with its defaults) and `nginx`, each with 2 workers in front
# of the same echo upstream. For each target and load: a warm-up, REPEATS
# runs with the CPU time and context switches of the proxy's threads read
# from /proc before and after, then one run under `strace -c -f` (slowed by
# strace; only its counts are used). Prints two Markdown tables, and how the
# echo runs' CPU fell on the proxy's two busiest threads.
#
# Usage: bench/costs.sh        (as root on Debian, for apt-get and strace)
# Knobs: TARGETS="wsgate wsgate_via_pingora wsgate_stealing wsgate_no_keepalive
#                 pingora nginx"
#        REPEATS=3 SECS=4s CONC=32 ECHO_CONNS=50
#        BASE=<git revision>: also measure wsgate as built from that
#        revision, with the same config, right after `wsgate` (target
#        `base`, shown as `wsgate@<revision>`), to show a change side by side.
set -euo pipefail

TARGETS=${TARGETS:-wsgate wsgate_via_pingora wsgate_stealing wsgate_no_keepalive pingora nginx}
BASE=${BASE:-}
if [ -n "$BASE" ] && [[ " $TARGETS " != *" base "* ]]; then
    TARGETS=${TARGETS/wsgate /wsgate base }
    [[ " $TARGETS " == *" base "* ]] || TARGETS="base $TARGETS"
fi
REPEATS=${REPEATS:-3}
SECS=${SECS:-4s}
CONC=${CONC:-32}
ECHO_CONNS=${ECHO_CONNS:-50}

cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-$(pwd)/target}
WORK=$(mktemp -d /tmp/wsgate-costs.XXXXXX)
UP_PID=""
PID=""
STRACE_PID=""

log() { echo "[costs $(date +%T)] $*" >&2; }
. bench/lib.sh

cleanup() {
    [ -n "$STRACE_PID" ] && stop_pid "$STRACE_PID"
    [ -n "$PID" ] && stop_pid "$PID"
    [ -n "$UP_PID" ] && stop_pid "$UP_PID"
    [ -d "$WORK/base" ] && git worktree remove --force "$WORK/base"
    return 0
}
trap cleanup EXIT

# CPU ticks of each thread of the given comma-separated PIDs, one
# `tid ticks` line each, sorted for `join`.
thread_ticks() {
    local pid task fields
    for pid in ${1//,/ }; do
        for task in /proc/"$pid"/task/*; do
            read -r -a fields < <(sed 's/^.*) //' "$task/stat")
            echo "${task##*/} $((fields[11] + fields[12]))"
        done
    done | sort
}

# --- install and build ---------------------------------------------------------
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v strace >/dev/null || need+=(strace)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} from Debian's packages"
    # Its output goes with the log, not into the tables on stdout.
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

# The base revision first, in a worktree sharing the target directory (so
# only what differs is rebuilt); its binary is copied out before the
# current tree's build below replaces it.
if [ -n "$BASE" ]; then
    log "building wsgate at $BASE (release)"
    git worktree add --detach "$WORK/base" "$BASE" >&2
    (cd "$WORK/base" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --bin wsgate >&2)
    cp "$TARGET_DIR/release/wsgate" "$WORK/wsgate-base"
    git worktree remove --force "$WORK/base" >&2
fi

log "building (release)"
cargo build --release --bin wsgate --example wsload --example echo_upstream \
    --example bare_pingora >&2
WSGATE=$TARGET_DIR/release/wsgate
WSLOAD=$TARGET_DIR/release/examples/wsload
ECHO=$TARGET_DIR/release/examples/echo_upstream
BARE=$TARGET_DIR/release/examples/bare_pingora
TICK=$(getconf CLK_TCK)

# --- configs: bench/run.sh's, measured on /ws -------------------------------------
UP=$(free_port); WG=$(free_port); WG_ADMIN=$(free_port); NG=$(free_port); BP=$(free_port)
WS=$(free_port); WS_ADMIN=$(free_port); WV=$(free_port); WV_ADMIN=$(free_port)
WK=$(free_port); WK_ADMIN=$(free_port)
write_wsgate_config "$WORK/wsgate.yaml" "$WG" "$WG_ADMIN" "$UP"
write_wsgate_config "$WORK/stealing.yaml" "$WS" "$WS_ADMIN" "$UP" "  work_stealing: true
"
"$WSGATE" check --config "$WORK/wsgate.yaml" >&2
write_wsgate_config "$WORK/via_pingora.yaml" "$WV" "$WV_ADMIN" "$UP" "  own_handshake: false
"
write_wsgate_config "$WORK/no_keepalive.yaml" "$WK" "$WK_ADMIN" "$UP" "  tcp_keepalive: false
"
"$WSGATE" check --config "$WORK/stealing.yaml" >&2
"$WSGATE" check --config "$WORK/via_pingora.yaml" >&2
"$WSGATE" check --config "$WORK/no_keepalive.yaml" >&2
write_nginx_config "$WORK" "$NG" "$UP"

"$ECHO" "127.0.0.1:$UP" >"$WORK/echo.log" 2>&1 &
UP_PID=$!
wait_port "$UP"

# Measures one target already listening on $PORT, whose processes are $PIDS:
# `what` is `rate` (upgrade then close) or `echo` (64 B messages).
measure() {
    local target=$1 what=$2 url=$3 load count
    case $what in
        rate) load=(rate "$url" -c "$CONC"); count=.tally.upgraded ;;
        echo) load=(echo "$url" -c "$ECHO_CONNS" --size 64); count=.messages ;;
    esac
    "$WSLOAD" "${load[@]}" --duration 2s >/dev/null

    local rates=() users=() syss=() switches=() split=() out n
    for _ in $(seq "$REPEATS"); do
        read -r u0 s0 c0 < <(usage_of "$PIDS")
        thread_ticks "$PIDS" >"$WORK/ticks.0"
        out=$("$WSLOAD" "${load[@]}" --duration "$SECS")
        read -r u1 s1 c1 < <(usage_of "$PIDS")
        thread_ticks "$PIDS" >"$WORK/ticks.1"
        # The two busiest threads' share of a core over the run, in %.
        split+=("$(join "$WORK/ticks.0" "$WORK/ticks.1" | awk '{ print $3 - $2 }' | sort -rn \
            | head -2 | awk -v d="$(jq .seconds <<<"$out")" -v hz="$TICK" \
                '{ printf "%s%.0f", (NR > 1 ? "/" : ""), 100 * $1 / hz / d }')")
        n=$(jq "$count" <<<"$out")
        rates+=("$(python3 -c "print($n / $(jq .seconds <<<"$out"))")")
        users+=("$(python3 -c "print(($u1 - $u0) * 1e6 / $TICK / $n)")")
        syss+=("$(python3 -c "print(($s1 - $s0) * 1e6 / $TICK / $n)")")
        switches+=("$(python3 -c "print(($c1 - $c0) / $n)")")
    done

    echo "| $target | ${split[*]} |" >>"$WORK/threads.$what"

    strace -c -f -o "$WORK/strace.$target.$what" \
        $(for p in ${PIDS//,/ }; do echo "-p $p"; done) 2>/dev/null &
    STRACE_PID=$!
    sleep 1
    out=$("$WSLOAD" "${load[@]}" --duration 3s)
    kill -INT "$STRACE_PID"; wait "$STRACE_PID" 2>/dev/null || true; STRACE_PID=""

    python3 - "$target" "$WORK/strace.$target.$what" "$(jq "$count" <<<"$out")" "${rates[*]}" \
        "${users[*]}" "${syss[*]}" "${switches[*]}" >>"$WORK/table.$what" <<'PY'
import statistics, sys
target, trace, traced = sys.argv[1], sys.argv[2], int(sys.argv[3])
med = lambda s: statistics.median(float(x) for x in s.split())
calls, top = 0, []
for line in open(trace):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit():
        if f[-1] == "total":
            calls = int(f[3])
        else:
            top.append((int(f[3]), f[-1]))
top.sort(reverse=True)
detail = ", ".join(f"{name} {n / traced:.1f}" for n, name in top if n / traced >= 0.9)
print(f"| {target} | {med(sys.argv[4]):,.0f} | {med(sys.argv[5]):.1f} | {med(sys.argv[6]):.1f} "
      f"| {med(sys.argv[7]):.2f} | {calls / traced:.1f} ({detail}) |")
PY
}

for target in $TARGETS; do
    case $target in
        wsgate) PORT=$WG
            WSGATE_LOG=warn "$WSGATE" --config "$WORK/wsgate.yaml" >>"$WORK/wsgate.log" 2>&1 &
            PID=$! ;;
        base) PORT=$WG
            [ -n "$BASE" ] || { log "target base needs BASE=<git revision>"; exit 2; }
            WSGATE_LOG=warn "$WORK/wsgate-base" --config "$WORK/wsgate.yaml" >>"$WORK/base.log" 2>&1 &
            PID=$! ;;
        wsgate_stealing) PORT=$WS
            WSGATE_LOG=warn "$WSGATE" --config "$WORK/stealing.yaml" >>"$WORK/stealing.log" 2>&1 &
            PID=$! ;;
        wsgate_via_pingora) PORT=$WV
            WSGATE_LOG=warn "$WSGATE" --config "$WORK/via_pingora.yaml" >>"$WORK/via_pingora.log" 2>&1 &
            PID=$! ;;
        wsgate_no_keepalive) PORT=$WK
            WSGATE_LOG=warn "$WSGATE" --config "$WORK/no_keepalive.yaml" >>"$WORK/no_keepalive.log" 2>&1 &
            PID=$! ;;
        pingora) PORT=$BP
            "$BARE" "127.0.0.1:$BP" "127.0.0.1:$UP" 2 >>"$WORK/pingora.log" 2>&1 &
            PID=$! ;;
        nginx) PORT=$NG
            start_nginx "$WORK" "$WORK/nginx.log"
            PID=$NGINX_PID ;;
        *) log "unknown target $target"; exit 2 ;;
    esac
    wait_port "$PORT"
    sleep 0.5
    PIDS=$(pid_tree "$PID")
    label=$target
    [ "$target" = base ] && label="wsgate@$BASE"
    log "$label"
    measure "$label" rate "ws://127.0.0.1:$PORT/ws"
    measure "$label" echo "ws://127.0.0.1:$PORT/ws"
    stop_pid "$PID"; PID=""
    sleep 1
done

for what in rate echo; do
    case $what in
        rate) echo "Per upgrade (upgrade then close, $CONC at once):" ;;
        echo) echo "Per 64 B message echoed ($ECHO_CONNS connections):" ;;
    esac
    echo
    printf '| target | per second | user µs | system µs | context switches | system calls (strace) |\n'
    printf '| --- | --- | --- | --- | --- | --- |\n'
    cat "$WORK/table.$what"
    echo
done
echo "Busiest two threads' share of a core during each 64 B echo run (%):"
echo
printf '| target | busiest/next, per run |\n| --- | --- |\n'
cat "$WORK/threads.echo"
echo
log "medians of $REPEATS runs of $SECS each; work files in $WORK"
