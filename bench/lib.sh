# Helpers shared by the bench scripts; sourced, not run. The sourcing script
# defines `log`.

# Stops one process we started: SIGTERM, then SIGKILL after 10 s.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits up to 10 s for a TCP listener on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    log "nothing listens on port $1"
    return 1
}

# PID and its children (nginx's workers), comma-separated.
pid_tree() {
    local pids=$1 child
    for child in $(cat "/proc/$1/task/$1/children" 2>/dev/null); do
        pids="$pids,$child"
    done
    echo "$pids"
}

# Summed user ticks, system ticks and context switches of every thread of
# the given comma-separated PIDs. The fields are read after the command
# name, which may hold spaces.
usage_of() {
    local user=0 sys=0 switches=0 pid task fields
    for pid in ${1//,/ }; do
        for task in /proc/"$pid"/task/*; do
            read -r -a fields < <(sed 's/^.*) //' "$task/stat")
            user=$((user + fields[11]))
            sys=$((sys + fields[12]))
            switches=$((switches + $(awk '/ctxt_switches/ { n += $2 } END { print n }' "$task/status")))
        done
    done
    echo "$user $sys $switches"
}

# The bench's wsgate config, written to FILE (ending in .yaml): listening on
# PORT with its admin on ADMIN, routes /ws (10,000 streams, 10 per client)
# and /burst (100, 10 per client) to the upstream on UP_PORT; EXTRA, if
# given, is more lines of its `server:` section; THREADS its threads (2).
# Its pid file and upgrade socket sit beside FILE.
# Usage: write_wsgate_config FILE PORT ADMIN UP_PORT [EXTRA] [THREADS]
write_wsgate_config() {
    cat >"$1" <<EOF
listen:
  - address: 127.0.0.1:$2
admin:
  address: 127.0.0.1:$3
server:
  threads: ${6:-2}
  pid_file: ${1%.yaml}.pid
  upgrade_sock: ${1%.yaml}.sock
  grace_period: 1s
${5:-}routes:
  - name: burst
    prefix: /burst
    upstream: { url: "http://127.0.0.1:$4" }
    limits: { total: 100, per_client: 10 }
    reject: { status: 503, retry_after: 5s }
  - name: ws
    prefix: /ws
    upstream: { url: "http://127.0.0.1:$4" }
    limits: { total: 10000, per_client: 10 }
    reject: { status: 503, retry_after: 5s }
EOF
}

# The same limits for nginx (limit_conn), written to DIR/nginx.conf, with
# its pid, logs and temporary files under DIR/nginx; WORKERS worker
# processes (2).
# Usage: write_nginx_config DIR PORT UP_PORT [WORKERS]
write_nginx_config() {
    mkdir -p "$1/nginx/logs"
    cat >"$1/nginx.conf" <<EOF
worker_processes ${4:-2};
worker_rlimit_nofile 20000;
pid $1/nginx/nginx.pid;
error_log $1/nginx/logs/error.log error;
events { worker_connections 20000; }
http {
    access_log off;
    client_body_temp_path $1/nginx/tmp;
    proxy_temp_path $1/nginx/tmp;
    map \$uri \$ws_route { ~^/burst burst; default ws; }
    limit_conn_zone \$ws_route zone=route_ws:1m;
    limit_conn_zone \$ws_route zone=route_burst:1m;
    limit_conn_zone \$binary_remote_addr zone=client_ws:10m;
    limit_conn_zone \$binary_remote_addr zone=client_burst:10m;
    limit_conn_status 503;
    upstream echo { server 127.0.0.1:$3; }
    server {
        listen 127.0.0.1:$2;
        proxy_http_version 1.1;
        proxy_set_header Upgrade \$http_upgrade;
        proxy_set_header Connection "upgrade";
        proxy_read_timeout 1h;
        proxy_send_timeout 1h;
        error_page 503 @over;
        location /ws { limit_conn route_ws 10000; limit_conn client_ws 10; proxy_pass http://echo; }
        location /burst { limit_conn route_burst 100; limit_conn client_burst 10; proxy_pass http://echo; }
        location @over { add_header Retry-After 5 always; return 503 "over limit\n"; }
    }
}
EOF
}

# Starts nginx in the background, in the foreground of its own job, with
# the config write_nginx_config wrote to DIR, appending its output to LOG;
# sets NGINX_PID to its master's PID. NGINX names the binary (nginx).
# Usage: start_nginx DIR LOG
start_nginx() {
    "${NGINX:-nginx}" -c "$1/nginx.conf" -p "$1/nginx" -e "$1/nginx/logs/error.log" \
        -g 'daemon off;' >>"$2" 2>&1 &
    NGINX_PID=$!
}
