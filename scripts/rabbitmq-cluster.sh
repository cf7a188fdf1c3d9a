#!/usr/bin/env bash
# A local three-node RabbitMQ cluster on ports of its own, for failover tests, the chaos suite and
# anyone who wants to try voucher-bridge against a cluster. It never touches the broker on 5672:
# its nodes have their own names, ports, Erlang cookie, config, data and log folders.
#
#   scripts/rabbitmq-cluster.sh up | down | status | stop-node N | start-node N | urls [--tls]
#
# Node N (1..3) listens on 127.0.0.1 only: AMQP BASE+N, AMQP over TLS BASE+10+N, Erlang
# distribution BASE+20000+N, management (when enabled) BASE+10000+N. BASE is
# RABBITMQ_CLUSTER_PORT_BASE (default 5700: AMQP 5701-5703, TLS 5711-5713).
#
# Settings (environment):
#   RABBITMQ_CLUSTER_PORT_BASE   see above
#   RABBITMQ_CLUSTER_DIR         where the nodes live (default /tmp/voucher-bridge-rabbitmq-BASE)
#   RABBITMQ_CLUSTER_TLS_DIR     ca.pem, server.pem, server.key to serve TLS with; without it `up`
#                                makes a CA and a certificate for localhost and 127.0.0.1 (openssl)
#   RABBITMQ_CLUSTER_MANAGEMENT  1 (default) enables the management plugin; 0 starts faster
#
# Exit status 3 means rabbitmq-server is not installed here (tests skip on it).
set -euo pipefail

BASE="${RABBITMQ_CLUSTER_PORT_BASE:-5700}"
DIR="${RABBITMQ_CLUSTER_DIR:-/tmp/voucher-bridge-rabbitmq-$BASE}"
MANAGEMENT="${RABBITMQ_CLUSTER_MANAGEMENT:-1}"
NODES=(1 2 3)
RMQ_BIN=/usr/lib/rabbitmq/bin
START_TIMEOUT_S=90

die() {
    echo "rabbitmq-cluster: $*" >&2
    exit 1
}

if [[ ! -x "$RMQ_BIN/rabbitmq-server" ]]; then
    echo "rabbitmq-cluster: rabbitmq-server is not installed (apt-get install rabbitmq-server)" >&2
    exit 3
fi

node_name() { echo "vb-$BASE-$1@localhost"; }
amqp_port() { echo $((BASE + $1)); }
tls_port() { echo $((BASE + 10 + $1)); }
dist_port() { echo $((BASE + 20000 + $1)); }
mgmt_port() { echo $((BASE + 10000 + $1)); }

# Every RabbitMQ command runs as the rabbitmq user, with this cluster's HOME (its Erlang cookie)
# and env file, so neither the shared node's cookie nor /etc/rabbitmq/rabbitmq-env.conf is used.
as_rabbitmq() {
    local env=(HOME="$DIR/home" RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" ERL_EPMD_ADDRESS=127.0.0.1)
    if [[ "$(id -un)" == rabbitmq ]]; then
        env "${env[@]}" "$@"
    elif [[ "$(id -u)" == 0 ]]; then
        runuser -u rabbitmq -- env "${env[@]}" "$@"
    else
        die "run as root or as the rabbitmq user"
    fi
}

ctl() {
    local n=$1
    shift
    as_rabbitmq "$RMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@"
}

make_tls() {
    local tls="$DIR/tls"
    mkdir -p "$tls"
    if [[ -n "${RABBITMQ_CLUSTER_TLS_DIR:-}" ]]; then
        cp "$RABBITMQ_CLUSTER_TLS_DIR"/{ca.pem,server.pem,server.key} "$tls/"
        return
    fi
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=voucher-bridge test CA" \
        -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$tls/san.ext"
    openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
        -CAcreateserial -days 30 -extfile "$tls/san.ext" -out "$tls/server.pem" 2>/dev/null
}

write_node() {
    local n=$1 folder="$DIR/node$1"
    mkdir -p "$folder/mnesia" "$folder/log"
    cat >"$folder/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
listeners.ssl.1 = 127.0.0.1:$(tls_port "$n")
ssl_options.cacertfile = $DIR/tls/ca.pem
ssl_options.certfile = $DIR/tls/server.pem
ssl_options.keyfile = $DIR/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
management.tcp.ip = 127.0.0.1
management.tcp.port = $(mgmt_port "$n")
log.file.level = info
CONF
    if [[ "$MANAGEMENT" == 1 ]]; then
        echo "[rabbitmq_management]." >"$folder/enabled_plugins"
    else
        echo "[]." >"$folder/enabled_plugins"
    fi
}

start_node() {
    local n=$1 folder="$DIR/node$1"
    [[ -d "$folder" ]] || die "node $n does not exist: run \`$0 up\` first"
    if ctl "$n" status >/dev/null 2>&1; then
        return 0
    fi
    as_rabbitmq \
        RABBITMQ_NODENAME="$(node_name "$n")" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
        RABBITMQ_DIST_PORT="$(dist_port "$n")" \
        RABBITMQ_CONFIG_FILE="$folder/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$folder/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$folder/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$folder/mnesia" \
        RABBITMQ_MNESIA_DIR="$folder/mnesia/$(node_name "$n")" \
        RABBITMQ_LOG_BASE="$folder/log" \
        RABBITMQ_PID_FILE="$folder/pid" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        "$RMQ_BIN/rabbitmq-server" -detached >"$folder/log/startup.log" 2>&1
}

await_node() {
    local n=$1 deadline=$((SECONDS + START_TIMEOUT_S))
    # await_startup fails at once while the new VM is not reachable yet: wait for that first.
    until ctl "$n" status >/dev/null 2>&1 || ((SECONDS >= deadline)); do sleep 0.5; done
    if ! ctl "$n" await_startup --timeout "$START_TIMEOUT_S" >/dev/null 2>&1; then
        tail -n 20 "$DIR/node$n/log/"*.log >&2 || true
        die "node $n ($(node_name "$n")) did not start within ${START_TIMEOUT_S}s"
    fi
}

stop_node() {
    local n=$1
    if ctl "$n" status >/dev/null 2>&1; then
        # With the pid file, stop returns only once the Erlang VM has exited.
        ctl "$n" stop "$DIR/node$n/pid" >/dev/null
    fi
}

up() {
    if [[ -f "$DIR/formed" ]]; then
        for n in "${NODES[@]}"; do start_node "$n"; done
        for n in "${NODES[@]}"; do await_node "$n"; done
        status
        return
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR/home"
    head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/home/.erlang.cookie"
    chmod 400 "$DIR/home/.erlang.cookie"
    : >"$DIR/rabbitmq-env.conf"
    make_tls
    for n in "${NODES[@]}"; do write_node "$n"; done
    chown -R rabbitmq:rabbitmq "$DIR" 2>/dev/null || [[ "$(id -un)" == rabbitmq ]]
    chmod -R go+r "$DIR/tls"
    chmod 400 "$DIR/home/.erlang.cookie"
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in "${NODES[@]}"; do await_node "$n"; done
    local first
    first="$(node_name 1)"
    for n in "${NODES[@]:1}"; do
        ctl "$n" stop_app >/dev/null
        ctl "$n" join_cluster "$first" >/dev/null
        ctl "$n" start_app >/dev/null
    done
    touch "$DIR/formed"
    status
}

down() {
    [[ -d "$DIR" ]] || return 0
    for n in "${NODES[@]}"; do stop_node "$n" & done
    wait
    # A node VM that never became reachable (a start that failed half-way) ignores rabbitmqctl:
    # end it by its HOME, which only this cluster's nodes have.
    local pids
    pids="$(pgrep -f -- "-home $DIR/home " || true)"
    if [[ -n "$pids" ]]; then
        kill $pids 2>/dev/null || true
        sleep 2
        kill -9 $pids 2>/dev/null || true
    fi
    rm -rf "$DIR"
}

status() {
    for n in "${NODES[@]}"; do
        local state=stopped
        if ctl "$n" status >/dev/null 2>&1; then state=running; fi
        printf 'node %s %-22s amqp://127.0.0.1:%s  amqps://localhost:%s  %s\n' \
            "$n" "$(node_name "$n")" "$(amqp_port "$n")" "$(tls_port "$n")" "$state"
    done
    for n in "${NODES[@]}"; do
        if ctl "$n" status >/dev/null 2>&1; then
            ctl "$n" cluster_status --formatter json | python3 -c \
                'import json,sys; s=json.load(sys.stdin); print("running nodes:", " ".join(sorted(s["running_nodes"])))'
            return
        fi
    done
}

# The comma-separated BRIDGE_AMQP_URL for this cluster.
urls() {
    local list=()
    for n in "${NODES[@]}"; do
        if [[ "${1:-}" == --tls ]]; then
            list+=("amqps://guest:guest@localhost:$(tls_port "$n")/")
        else
            list+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/")
        fi
    done
    (IFS=,; echo "${list[*]}")
}

check_n() {
    [[ "${1:-}" =~ ^[123]$ ]] || die "node number must be 1, 2 or 3 (got '${1:-}')"
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
stop-node) check_n "${2:-}"; stop_node "$2" ;;
start-node) check_n "${2:-}"; start_node "$2"; await_node "$2" ;;
urls) urls "${2:-}" ;;
*)
    echo "usage: $0 up|down|status|stop-node N|start-node N|urls [--tls]" >&2
    exit 2
    ;;
esac
