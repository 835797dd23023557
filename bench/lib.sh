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
