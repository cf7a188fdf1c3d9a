#!/usr/bin/env bash
# Makes sure RabbitMQ answers at BRIDGE_AMQP_URL before tests or the demo run.
# Order: already up; a local rabbitmq-server; `docker compose up -d rabbitmq`; else explain.
set -euo pipefail

url="${BRIDGE_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
wait_s="${BRIDGE_BROKER_WAIT_S:-60}"

# BRIDGE_AMQP_URL may list a cluster's nodes, comma-separated: one node answering is enough.
answers() {
    python3 - "$url" <<'PY'
import socket, sys
from urllib.parse import urlsplit

def answers(url: str) -> bool:
    u = urlsplit(url.strip())
    tls = u.scheme == "amqps"
    host, port = u.hostname or "127.0.0.1", u.port or (5671 if tls else 5672)
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            if tls:
                return True  # a TLS listener takes the connection; the bridge checks the rest
            s.sendall(b"AMQP\x00\x00\x09\x01")
            s.settimeout(5)
            # A broker answers the protocol header with a Connection.Start method frame (type 1).
            return s.recv(8)[:1] == b"\x01"
    except (OSError, ValueError):
        return False

sys.exit(0 if any(answers(u) for u in sys.argv[1].split(",") if u.strip()) else 1)
PY
}

wait_until_up() {
    local deadline=$((SECONDS + wait_s))
    until answers; do
        if ((SECONDS >= deadline)); then
            echo "RabbitMQ did not answer at $url within ${wait_s}s." >&2
            exit 1
        fi
        sleep 1
    done
}

if answers; then
    exit 0
fi

echo "RabbitMQ does not answer at $url; trying to start one." >&2
if command -v rabbitmq-server >/dev/null 2>&1; then
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_until_up
    echo "Started the local rabbitmq-server." >&2
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    # compose.yaml requires BRIDGE_KEY_SECRETS for the bridge services; the broker needs none.
    BRIDGE_KEY_SECRETS="${BRIDGE_KEY_SECRETS:-unused-broker-only-secret}" docker compose up -d rabbitmq
    wait_until_up
    echo "Started RabbitMQ with docker compose." >&2
else
    cat >&2 <<MSG
No RabbitMQ answers at $url, and none can be started here.
Get one of:
  - a local broker:   apt-get install rabbitmq-server && rabbitmq-server -detached
  - Docker:           docker compose up -d rabbitmq
  - another broker:   export BRIDGE_AMQP_URL=amqp://user:pass@host:5672/
MSG
    exit 1
fi
