#!/usr/bin/env bash
# A throw-away Prometheus server for tests and local runs, bound to 127.0.0.1 and managed by PID file.
#
#   bash scripts/prometheus_server.sh install                     # apt-get install prometheus if missing
#   bash scripts/prometheus_server.sh start DIR CONFIG [PORT]     # serve on 127.0.0.1:PORT (default 9090), wait
#   bash scripts/prometheus_server.sh stop DIR                    # stop the server started for DIR (by its PID)
#
# DIR holds the TSDB, prometheus.pid and prometheus.log. `start` prints the server's URL once it answers
# /-/ready. No systemd: the Debian package's service is not used, the binary is started directly.
set -euo pipefail

install() {
    if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
        return
    fi
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    # Debian's postinst tries to start the service; without systemd/invoke-rc.d that is a harmless no-op here.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends prometheus >/dev/null ||
        { $sudo apt-get update >/dev/null && \
          DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends prometheus >/dev/null; }
    # The package may have started its own instance on :9090 (systemd hosts); ours run on explicit ports anyway.
}

start() {
    local dir=$1 config=$2 port=${3:-9090}
    install
    mkdir -p "$dir"
    if [ -f "$dir/prometheus.pid" ] && kill -0 "$(cat "$dir/prometheus.pid")" 2>/dev/null; then
        echo "prometheus_server.sh: already running for $dir (pid $(cat "$dir/prometheus.pid"))" >&2
        exit 1
    fi
    prometheus --config.file="$config" --storage.tsdb.path="$dir/data" \
        --web.listen-address="127.0.0.1:$port" --web.enable-lifecycle \
        --storage.tsdb.retention.time=1d >"$dir/prometheus.log" 2>&1 &
    echo $! >"$dir/prometheus.pid"
    for _ in $(seq 1 60); do
        if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/-/ready', timeout=1)" \
                2>/dev/null; then
            echo "http://127.0.0.1:$port"
            return
        fi
        if ! kill -0 "$(cat "$dir/prometheus.pid")" 2>/dev/null; then
            echo "prometheus_server.sh: prometheus exited; last log lines:" >&2
            tail -5 "$dir/prometheus.log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "prometheus_server.sh: not ready after 30 s; see $dir/prometheus.log" >&2
    stop "$dir"
    exit 1
}

stop() {
    local dir=$1 pid
    [ -f "$dir/prometheus.pid" ] || return 0
    pid=$(cat "$dir/prometheus.pid")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/prometheus.pid"
}

case "${1:-}" in
    install) install ;;
    start) [ $# -ge 3 ] || { echo "usage: $0 start DIR CONFIG [PORT]" >&2; exit 2; }; start "$2" "$3" "${4:-9090}" ;;
    stop) [ $# -ge 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop "$2" ;;
    *) echo "usage: $0 install | start DIR CONFIG [PORT] | stop DIR" >&2; exit 2 ;;
esac
