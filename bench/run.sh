#!/usr/bin/env bash
# Benchmarks wsgate beside nginx and HAProxy, all in one run on loopback,
# and writes the results table to docs/benchmarks.md.
#
# Targets, interleaved in every repeat: `direct` (the echo upstream itself),
# `wsgate`, `wsgate_via_pingora` (the same with `server.own_handshake:
# false`, every upgrade through Pingora's HTTP proxy), `pingora`
# (examples/bare_pingora.rs: Pingora 0.9 with its defaults and no limits, to
# show what Pingora itself costs), `nginx` (limit_conn) and `haproxy`
# (stick-table conn_cur). Every proxy but the bare one gets the same limits:
# route /ws 10,000 streams and 10 per client, route /burst 100 streams and 10
# per client, 503 with Retry-After over them.
# Each proxy is started fresh for each repeat and stopped by its PID.
#
# Measured per target and repeat, with examples/wsload.rs:
#   hold   after an unrecorded warm-up of WARM streams, HELD streams opened
#          over loopback sources, held HOLD; RSS of the
#          proxy processes at baseline, held and after close
#   rate   upgrade+close per second from RATE_CONC tasks for RATE_SECS
#   echo   ECHO_CONNS connections echoing 64 B and 16 KiB messages
#   burst  BURST_N upgrades at once against /burst (route limit 100) and 50
#          from one client (client limit 10): 101s must be exactly the limit
#
# Usage: bench/run.sh            (as root on Debian, for apt-get)
# Knobs: HELD=9900 WARM=1000 REPEATS=3 HOLD=3s ECHO_SECS=5s RATE_SECS=5s OUT=docs/benchmarks.md
set -euo pipefail

HELD=${HELD:-9900}
WARM=${WARM:-1000}
REPEATS=${REPEATS:-3}
HOLD=${HOLD:-3s}
ECHO_CONNS=${ECHO_CONNS:-50}
ECHO_SECS=${ECHO_SECS:-5s}
RATE_SECS=${RATE_SECS:-5s}
RATE_CONC=${RATE_CONC:-32}
BURST_N=${BURST_N:-300}
OUT=${OUT:-docs/benchmarks.md}

cd "$(dirname "$0")/.."
ROOT=$(pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d /tmp/wsgate-bench.XXXXXX)
RESULTS=$WORK/results.jsonl
# The processes this script started and has not stopped yet.
UP_PID=""
PID=""

log() { echo "[bench $(date +%T)] $*" >&2; }
. bench/lib.sh

cleanup() {
    [ -n "$PID" ] && stop_pid "$PID"
    [ -n "$UP_PID" ] && stop_pid "$UP_PID"
    return 0
}
trap cleanup EXIT

# --- install -----------------------------------------------------------------
if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
    log "installing nginx and haproxy from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

log "building (release)"
cargo build --release --bin wsgate --example wsload --example echo_upstream \
    --example bare_pingora >&2
WSGATE=$TARGET_DIR/release/wsgate
WSLOAD=$TARGET_DIR/release/examples/wsload
ECHO=$TARGET_DIR/release/examples/echo_upstream
BARE=$TARGET_DIR/release/examples/bare_pingora

# --- configs -----------------------------------------------------------------
UP=$(free_port)
WG=$(free_port); WG_ADMIN=$(free_port); NG=$(free_port); HA=$(free_port); BP=$(free_port)
WV=$(free_port); WV_ADMIN=$(free_port)

write_wsgate_config "$WORK/wsgate.yaml" "$WG" "$WG_ADMIN" "$UP"
write_wsgate_config "$WORK/via_pingora.yaml" "$WV" "$WV_ADMIN" "$UP" "  own_handshake: false
"

write_nginx_config "$WORK" "$NG" "$UP"

cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 9950
    nbthread 2
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout http-request 10s
frontend fe
    bind 127.0.0.1:$HA
    maxconn 9950
    acl burst path_beg /burst
    http-request track-sc0 src table t_client_burst if burst
    http-request track-sc1 str(burst) table t_route_burst if burst
    http-request track-sc0 src table t_client_ws if !burst
    http-request track-sc1 str(ws) table t_route_ws if !burst
    http-request return status 503 hdr Retry-After 5 content-type text/plain string "over limit" if { sc0_conn_cur gt 10 }
    http-request return status 503 hdr Retry-After 5 content-type text/plain string "over limit" if burst { sc1_conn_cur gt 100 }
    http-request return status 503 hdr Retry-After 5 content-type text/plain string "over limit" if !burst { sc1_conn_cur gt 10000 }
    default_backend echo
backend echo
    server up 127.0.0.1:$UP
backend t_client_ws
    stick-table type ip size 100k expire 1h store conn_cur
backend t_client_burst
    stick-table type ip size 100k expire 1h store conn_cur
backend t_route_ws
    stick-table type string len 16 size 10 expire 1h store conn_cur
backend t_route_burst
    stick-table type string len 16 size 10 expire 1h store conn_cur
EOF

"$WSGATE" check --config "$WORK/wsgate.yaml" >&2
"$WSGATE" check --config "$WORK/via_pingora.yaml" >&2
"$NGINX" -t -q -c "$WORK/nginx.conf" -p "$WORK/nginx" -e "$WORK/nginx/logs/error.log"
"$HAPROXY" -c -q -f "$WORK/haproxy.cfg"

# --- processes ---------------------------------------------------------------
"$ECHO" "127.0.0.1:$UP" >"$WORK/echo.log" 2>&1 &
UP_PID=$!
wait_port "$UP"

# Starts one target in the foreground of a background job; sets PORT, PID, PIDS.
start_target() {
    case $1 in
        direct) PORT=$UP; PID=""; PIDS=$UP_PID; return ;;
        wsgate) PORT=$WG
            WSGATE_LOG=warn "$WSGATE" --config "$WORK/wsgate.yaml" >>"$WORK/wsgate.log" 2>&1 &
            PID=$! ;;
        wsgate_via_pingora) PORT=$WV
            WSGATE_LOG=warn "$WSGATE" --config "$WORK/via_pingora.yaml" >>"$WORK/via_pingora.log" 2>&1 &
            PID=$! ;;
        pingora) PORT=$BP
            "$BARE" "127.0.0.1:$BP" "127.0.0.1:$UP" 2 >>"$WORK/pingora.log" 2>&1 &
            PID=$! ;;
        nginx) PORT=$NG
            start_nginx "$WORK" "$WORK/nginx.log"
            PID=$NGINX_PID ;;
        haproxy) PORT=$HA
            "$HAPROXY" -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" 2>&1 &
            PID=$! ;;
    esac
    wait_port "$PORT"
    sleep 0.5
    PIDS=$(pid_tree "$PID")
}

stop_target() {
    [ -n "$PID" ] && stop_pid "$PID"
    PID=""
    # Let sockets in FIN_WAIT and the upstream's tasks drain before the next target.
    sleep 1
}

# Runs wsload and tags its JSON line with target, repeat and case.
load() {
    local target=$1 repeat=$2 case=$3
    shift 3
    "$WSLOAD" "$@" | jq -c --arg t "$target" --arg c "$case" --argjson r "$repeat" \
        '. + {target: $t, case: $c, repeat: $r}' >>"$RESULTS"
}

# --- runs --------------------------------------------------------------------
BEGAN=$(date +%s)
for repeat in $(seq "$REPEATS"); do
    for target in direct wsgate wsgate_via_pingora pingora nginx haproxy; do
        log "repeat $repeat/$REPEATS: $target"
        start_target "$target"
        url="ws://127.0.0.1:$PORT"
        # Warm-up, not recorded: the first streams page in code and start
        # worker pools, which stay; the baseline is taken after them.
        "$WSLOAD" hold "$url/ws" -n "$WARM" --hold 1s >/dev/null
        sleep 2
        load "$target" "$repeat" hold hold "$url/ws" -n "$HELD" --hold "$HOLD" --pids "$PIDS"
        load "$target" "$repeat" rate rate "$url/ws" -c "$RATE_CONC" --duration "$RATE_SECS"
        load "$target" "$repeat" echo64 echo "$url/ws" -c "$ECHO_CONNS" --size 64 --duration "$ECHO_SECS"
        load "$target" "$repeat" echo16k echo "$url/ws" -c "$ECHO_CONNS" --size 16384 --duration "$ECHO_SECS"
        load "$target" "$repeat" burst_route burst "$url/burst" -n "$BURST_N" --per-source 10
        sleep 0.5
        load "$target" "$repeat" burst_client burst "$url/burst" -n 50 --per-source 50
        stop_target
    done
done
ELAPSED=$(( $(date +%s) - BEGAN ))

log "microbenchmarks (cargo bench --bench admission)"
cargo bench --bench admission -- --warm-up-time 0.5 --measurement-time 1.5 >"$WORK/micro.txt"

# --- report ------------------------------------------------------------------
MACHINE=$(printf '%s\n' "$(nproc) cores: $(lscpu | sed -n 's/^Model name: *//p' | head -1)" \
    "$(free -h | sed -n 2p | awk '{print "memory: " $2}')" "$(uname -srm)" \
    "$(. /etc/os-release && echo "$PRETTY_NAME")" \
    "$("$NGINX" -v 2>&1)" "$("$HAPROXY" -v | head -1)" "$(rustc --version)")

# The report command is kept beside the results, so that after editing
# bench/analysis.md the page can be written again without a new run.
REPORT=(python3 "$ROOT/bench/report.py" "$RESULTS" "$OUT"
    --machine "$MACHINE" --elapsed "$ELAPSED" --micro "$WORK/micro.txt"
    --params "HELD=$HELD WARM=$WARM REPEATS=$REPEATS HOLD=$HOLD ECHO_CONNS=$ECHO_CONNS ECHO_SECS=$ECHO_SECS RATE_SECS=$RATE_SECS RATE_CONC=$RATE_CONC BURST_N=$BURST_N"
    --config "wsgate.yaml=$WORK/wsgate.yaml" --config "nginx.conf=$WORK/nginx.conf"
    --config "haproxy.cfg=$WORK/haproxy.cfg")
{ echo '#!/usr/bin/env bash'; printf '%q ' "${REPORT[@]}"; echo; } >"$WORK/report.sh"
chmod +x "$WORK/report.sh"
"${REPORT[@]}"
log "wrote $OUT in ${ELAPSED}s of runs; raw results in $RESULTS; write it again with $WORK/report.sh"
