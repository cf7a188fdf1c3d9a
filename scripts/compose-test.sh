#!/usr/bin/env bash
# compose-test: build the image, run the compose stack for real, break it, and check it.
#
#   sudo make compose-test        # or: sudo scripts/compose-test.sh
#
# Needs root (the Docker socket) and a Docker engine, with Compose v2 (`docker compose`) or v1
# (`docker-compose`). It runs its own project (COMPOSE_PROJECT_NAME, default vb-compose-test),
# publishes only on loopback (OPS_BIND_ADDR and INGRESS_BIND_ADDR, default 127.0.0.2) and checks,
# in order:
#   1. the image builds; every service is healthy (the ledger's and the till's roles too) and
#      db-upgrade exited 0; the bridge runs as a non-root user;
#   2. the sandbox's story: every voucher ended as expected (read from the sandbox's logs) and
#      each activated voucher's PDF is in the pdfs volume;
#  2b. the till: the sandbox's sale at start and COMPOSE_TEST_TILL_SALES (10) more, each
#      reserved once by the intake, activated once, and activated in the ledger;
#   3. scaled to ingress=2 pdfs=3 doshii=2 reservations=2: the broker shows that many consumers
#      per queue and a connection named for the role and host of every replica; Prometheus
#      scrapes every worker replica;
#   4. a bounded load through the load balancer (COMPOSE_TEST_VOUCHERS, default 300): one
#      replica of the ingress and of each worker role (ledger included) is killed, then the
#      RabbitMQ container is restarted; every voucher ends activated exactly once (read from
#      the Doshii sandbox), no dead letters, and activated in the ledger once it caught up;
#   5. `stop` of every bridge service under load: each exits 0 within its grace period; once
#      started again, every voucher ends activated exactly once, and in the ledger;
#  5b. the ingress scaled to 3 behind the load balancer (`lb`, :8080): a load through it is
#      accepted by every replica, all three are scraped, every voucher activated once;
#   6. `down -v` leaves no container, volume or network of the project;
#   7. with compose.cluster.yaml (COMPOSE_TEST_CLUSTER=0 skips it): three RabbitMQ nodes form one
#      cluster, every work queue has a member on each, a load goes through while a node is
#      stopped and started again, every voucher activated once; then `down -v` again.
# Every load's vouchers must also end activated in the ledger (`bridge vouchers --json`).
# Prints a table (step, result, seconds) and exits 1 on any failure (2: cannot run here).
# COMPOSE_TEST_SCREENSHOT=docs/rabbitmq-queues.png also saves the management UI's queues page
# during step 3 (headless Chromium, scripts/rabbitmq_screenshot.py). COMPOSE_TEST_KEEP=1 leaves
# the stack up at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

PROJECT="${COMPOSE_PROJECT_NAME:-vb-compose-test}"
OPS="${OPS_BIND_ADDR:-127.0.0.2}"
VOUCHERS="${COMPOSE_TEST_VOUCHERS:-300}"
RATE_PER_S="${COMPOSE_TEST_RATE:-20}"
HEALTHY_TIMEOUT_S=240
STORY_TIMEOUT_S=300
SCRAPE_TIMEOUT_S=90
LOAD_TIMEOUT_S=900
GRACE_S=40 # compose.yaml's stop_grace_period for the bridge services
IMAGE=voucher-bridge:latest
NAMESPACE=bridge
RABBIT_USER=guest
RABBIT_PASS=guest
LEDGER_TIMEOUT_S=120
TILL_SALES="${COMPOSE_TEST_TILL_SALES:-10}"
TILL_TIMEOUT_S=180
# Every worker role: the four stages, the till's intake, and the ledger's writer and sweeper.
ROLES=(reservations pdfs lifecycle doshii intake ledger sweeper)
# The roles that consume a queue of their own (<ns>.<role>); the sweeper polls the ledger.
QUEUED_ROLES=(reservations pdfs lifecycle doshii intake ledger)
BRIDGE_SERVICES=(ingress "${ROLES[@]}")
# Run once to completion: healthy means exited 0.
ONE_SHOT=(db-upgrade)
declare -A SCALE=([pdfs]=3 [doshii]=2 [reservations]=2 [lifecycle]=1 [intake]=1 [ledger]=1 [sweeper]=1)
# From step 3 on; each replica spools into a folder of its own on the shared spool volume.
INGRESS_SCALE=2

export COMPOSE_PROJECT_NAME="$PROJECT" OPS_BIND_ADDR="$OPS"
export INGRESS_BIND_ADDR="${INGRESS_BIND_ADDR:-127.0.0.2}"
export BRIDGE_KEY_SECRETS="${BRIDGE_KEY_SECRETS:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}"

say() { printf '[compose-test %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
cannot_run() {
    printf 'compose-test cannot run here: %s\n' "$1" >&2
    exit 2
}

# Preconditions: root, an engine that answers, a compose.
[[ "$(id -u)" == 0 ]] || cannot_run "it needs root (the Docker socket); run it with sudo"
command -v docker >/dev/null || cannot_run "no docker CLI; install Docker"
docker info >/dev/null 2>&1 || cannot_run "no Docker engine answers (start dockerd; on a machine with no registry, ../shared/tools/container-lab.sh sets one up)"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    cannot_run "neither 'docker compose' (v2) nor 'docker-compose' (v1) is installed"
fi
if ! docker buildx version >/dev/null 2>&1; then
    # No buildx: BuildKit cannot run, the legacy builder can.
    export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
fi
for tool in curl python3; do
    command -v "$tool" >/dev/null || cannot_run "$tool is missing"
done

WORK="$(mktemp -d)"
FILES=(-f compose.yaml)
dc() { "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" --profile demo "$@"; }

# Every service, but Grafana when its image is not here (no registry): any other missing image
# fails step 1.
OPTIONAL_SERVICES=" grafana "
SERVICES=()
SKIPPED=()
MISSING=()
for service in $(dc config --services); do
    image="$(dc config | python3 -c '
import re, sys
text, service = sys.stdin.read(), sys.argv[1]
block = re.search(rf"^  {re.escape(service)}:\n((?:    .*\n|\n)*)", text, re.M)
found = re.search(r"^    image: (\S+)", block[1] if block else "", re.M)
print(found[1] if found else "")' "$service")"
    if [[ -n "$image" && "$image" != "$IMAGE" ]] && ! docker image inspect "$image" >/dev/null 2>&1; then
        if [[ "$OPTIONAL_SERVICES" == *" $service "* ]]; then
            SKIPPED+=("$service ($image not available)")
            continue
        fi
        MISSING+=("$image")
    fi
    SERVICES+=("$service")
done

# The table.
ROWS=()
FAILED=0
record() { # step, result, seconds, detail
    ROWS+=("$(printf '%-28s %-5s %6s  %s' "$1" "$2" "$3" "$4")")
    [[ "$2" == PASS ]] || FAILED=1
    say "$1: $2 ($3 s) $4"
}
print_table() {
    printf '\n%-28s %-5s %6s  %s\n' step result time detail
    printf '%s\n' "${ROWS[@]}"
    if ((${#SKIPPED[@]})); then printf 'not started: %s\n' "${SKIPPED[*]}"; fi
}

# Reading the stack.
containers() { # service -> container ids, oldest first
    docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | tac
}
cid() { containers "$1" | head -n1; }
ops_get() { curl -fsS --max-time 10 "$@"; }
rabbit_api() { ops_get -u "$RABBIT_USER:$RABBIT_PASS" "http://$OPS:15672/api/$1"; }
json() { python3 -c "import json, sys; data = json.load(sys.stdin); $1"; }

unhealthy() { # every project container not healthy (or not running, when it has no
    # healthcheck), and every one-shot container that has not exited 0
    local id name service status code health
    for id in $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"); do
        read -r name service status code health <<<"$(docker inspect -f '{{.Name}} {{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{.State.ExitCode}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")"
        if [[ " ${ONE_SHOT[*]} " == *" $service "* ]]; then
            [[ "$status $code" == "exited 0" ]] || echo "${name#/} $status (exit $code), not exited 0"
            continue
        fi
        case "$status $health" in
        "running healthy" | "running none") ;;
        *) echo "${name#/} $status $health" ;;
        esac
    done
}
one_shots_done() { # "db-upgrade exited 0" for every one-shot service, once wait_healthy passed
    local service
    for service in "${ONE_SHOT[@]}"; do
        printf '%s exited %s; ' "$service" "$(docker inspect -f '{{.State.ExitCode}}' "$(
            docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
                --filter "label=com.docker.compose.service=$service" | head -n1)")"
    done
}
wait_healthy() {
    local deadline=$((SECONDS + HEALTHY_TIMEOUT_S)) left
    while left="$(unhealthy)"; [[ -n "$left" ]]; do
        ((SECONDS < deadline)) || { echo "$left" | tr '\n' ';'; return 1; }
        sleep 2
    done
    ops_get "http://$OPS:9090/-/ready" >/dev/null || { echo "prometheus not ready"; return 1; }
}
queue_field() { # queue, field
    rabbit_api "queues/%2F/$NAMESPACE.$1" | json "print(data.get('$2', 0))"
}

# A load inside the sandbox container, in the background; its JSON summary lands in $1.
start_load() {
    docker exec "$(cid sandbox)" python -m sandbox.load --vouchers "$VOUCHERS" \
        --rate "$RATE_PER_S" --ingress http://lb:8080 >"$1" 2>"$1.log" &
    LOAD_PID=$!
}
finish_load() { # summary file -> "" when every voucher was activated once, else why not
    local deadline=$((SECONDS + LOAD_TIMEOUT_S))
    while kill -0 "$LOAD_PID" 2>/dev/null; do
        ((SECONDS < deadline)) || { kill "$LOAD_PID"; echo "load still running after ${LOAD_TIMEOUT_S}s"; return; }
        sleep 1
    done
    wait "$LOAD_PID"
    python3 - "$1" "$VOUCHERS" <<'PY'
import json, sys
try:
    s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except (IndexError, ValueError):
    print("the load printed no summary"); sys.exit()
wanted = int(sys.argv[2])
if not (s["ok"] and s["activated_once"] == wanted and s["lost"] == 0 and s["activated_twice"] == 0):
    print(f"vouchers {s['vouchers']} once {s['activated_once']} lost {s['lost']} "
          f"twice {s['activated_twice']}: {'; '.join(s['problems'][:3])}")
PY
}
# The ledger is written behind the activations (journal steps through <ns>.ledger), so it may
# lag: poll until it has every voucher of the load activated, or say what it has instead.
ledger_lags() { # summary file [voucher_id|request_id] -> "" once the ledger has every voucher
    # (or Doshii request) the summary names activated
    local deadline=$((SECONDS + LEDGER_TIMEOUT_S)) lag key="${2:-voucher_id}"
    while true; do
        docker exec "$(cid ledger)" bridge vouchers --json --limit 1000000 >"$1.ledger" 2>&1
        lag="$(python3 - "$1" "$1.ledger" "$key" <<'PY'
import collections, json, sys
summary = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
key = sys.argv[3]
states = {}
for line in open(sys.argv[2]):
    if line.startswith("{"):
        row = json.loads(line)
        states[row[key]] = row["state"]
wanted = summary[key + "s"]
off = collections.Counter(states.get(v, "absent") for v in wanted if states.get(v) != "activated")
if off:
    print(f"ledger: {len(wanted) - sum(off.values())}/{len(wanted)} activated, "
          + ", ".join(f"{n} {state}" for state, n in off.most_common()))
PY
)"
        [[ -n "$lag" ]] || return 0
        ((SECONDS < deadline)) || { echo "$lag after ${LEDGER_TIMEOUT_S}s"; return; }
        sleep 3
    done
}
load_detail() {
    python3 - "$1" <<'PY' 2>/dev/null
import json, sys
s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"{s['activated_once']}/{s['vouchers']} activated once, lost {s['lost']}, "
      f"twice {s['activated_twice']}, duplicate PUTs {s['duplicate_puts']}, "
      f"all final in {s['final_s']} s, all {len(s['voucher_ids'])} activated in the ledger")
PY
}
settled() { # "" when every work queue and delay tier is empty and the dead queue too
    rabbit_api "queues/%2F" | json "
busy = [f\"{q['name']}={q.get('messages', 0)}\" for q in data
        if q['name'].startswith('$NAMESPACE.') and q.get('messages', 0)]
print(' '.join(busy))"
}
wait_settled() {
    local deadline=$((SECONDS + 60)) busy
    while busy="$(settled)"; [[ -n "$busy" ]]; do
        ((SECONDS < deadline)) || { echo "not empty: $busy"; return; }
        sleep 2
    done
}

answered() { # container, outcome: notifications that ingress replica has answered so, so far
    docker exec "$1" python -c '
import re, sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8080/metrics", timeout=5).read().decode()
pattern = r"^bridge_ingress_requests_total\{[^}]*outcome=\"%s\"[^}]*\} (\S+)" % sys.argv[1]
print(int(sum(float(m[1]) for m in re.finditer(pattern, text, re.M))))' "$2"
}
spooled() { # notifications every ingress replica has answered `spooled` (the broker away)
    local total=0
    for id in $(containers ingress); do total=$((total + $(answered "$id" spooled))); done
    echo "$total"
}

cleanup() {
    local status=$?
    if [[ -n "${LOAD_PID:-}" ]] && kill -0 "$LOAD_PID" 2>/dev/null; then kill "$LOAD_PID"; fi
    if [[ -z "${DOWN_DONE:-}" && -z "${COMPOSE_TEST_KEEP:-}" ]]; then
        dc down -v --remove-orphans >/dev/null 2>&1
    fi
    if ((status == 0)); then rm -rf "$WORK"; else say "logs of the failed run kept in $WORK"; fi
    exit "$status"
}
trap cleanup EXIT

# 1. Build, up, healthy, non-root.
step_up() {
    local started=$SECONDS why="" size user uid id
    if ((${#MISSING[@]})); then
        record "1 healthy, non-root" FAIL 0 "images not here: ${MISSING[*]} (pull them, or run container-lab.sh)"
        return 1
    fi
    say "building $IMAGE"
    if ! docker build -q -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
        record "1 healthy, non-root" FAIL $((SECONDS - started)) "build failed: $(tail -3 "$WORK/build.log" | tr '\n' ' ')"
        return 1
    fi
    size="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
    IMAGE_MB=$((size / 1000000))
    say "image $IMAGE: $IMAGE_MB MB; starting ${SERVICES[*]}"
    dc down -v --remove-orphans >/dev/null 2>&1
    if ! dc up -d "${SERVICES[@]}" >"$WORK/up.log" 2>&1; then
        why="up failed: $(tail -3 "$WORK/up.log" | tr '\n' ' ')"
    elif ! why="$(wait_healthy)"; then
        why="not healthy after ${HEALTHY_TIMEOUT_S}s: $why"
    else
        why=""
        user="$(docker image inspect -f '{{.Config.User}}' "$IMAGE")"
        [[ -n "$user" && "${user%%:*}" != 0 && "${user%%:*}" != root ]] || why="image user is '$user'"
        for service in "${BRIDGE_SERVICES[@]}" sandbox; do
            id="$(cid "$service")"
            uid="$(docker exec "$id" id -u)"
            [[ "$uid" != 0 ]] || why="$why $service runs as root;"
        done
    fi
    if [[ -n "$why" ]]; then
        record "1 healthy, non-root" FAIL $((SECONDS - started)) "$why"
        return 1
    fi
    record "1 healthy, non-root" PASS $((SECONDS - started)) "${#SERVICES[@]} services healthy (${SERVICES[*]}), $(one_shots_done)uid $user, image $IMAGE_MB MB"
}

# 2. The sandbox's story, read from its container's logs; PDFs in the pdfs volume.
step_story() {
    local started=$SECONDS deadline=$((SECONDS + STORY_TIMEOUT_S)) detail
    until docker logs "$(cid sandbox)" 2>&1 | grep -q '"story finished"'; do
        if ((SECONDS >= deadline)); then
            record "2 sandbox story" FAIL $((SECONDS - started)) "no story finished in ${STORY_TIMEOUT_S}s"
            return 1
        fi
        sleep 2
    done
    docker logs "$(cid sandbox)" 2>&1 | grep '^{' >"$WORK/story.jsonl"
    detail="$(python3 - "$WORK/story.jsonl" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
first = next(l for l in lines if l.get("event") == "story finished")
vouchers = [l for l in lines if l.get("event") == "story voucher" and l.get("story") == first["story"]]
activated = [v["voucher_id"] for v in vouchers if v["status"] == "activated"]
print(first["verdict"], f"{first['ok']}/{first['vouchers']}", ",".join(activated))
PY
)"
    read -r verdict oks activated <<<"$detail"
    local missing=()
    for voucher in ${activated//,/ }; do
        docker exec "$(cid pdfs)" test -s "/srv/var/pdfs/$voucher.pdf" || missing+=("$voucher")
    done
    if [[ "$verdict" != OK || ${#missing[@]} -gt 0 ]]; then
        record "2 sandbox story" FAIL $((SECONDS - started)) "verdict $verdict ($oks ok); PDFs missing: ${missing[*]:-none}"
        return 1
    fi
    local pdfs
    pdfs="$(echo "${activated//,/ }" | wc -w)"
    record "2 sandbox story" PASS $((SECONDS - started)) "verdict OK, $oks vouchers as expected, $pdfs PDFs in the volume"
}

# 2b. The till: the sandbox's Doshii sells cards; its card_activate events go through lb to the
# ingress, the intake reserves each at the Jackpot sandbox, the chain activates it.
TILL_SCRIPT='
import json, sys, time, urllib.request
sales, wait_s = int(sys.argv[1]), float(sys.argv[2])
jackpot, doshii = "http://127.0.0.1:8091/_sandbox", "http://127.0.0.1:8092/_sandbox"
def call(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json"}, method=method)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)
def stock():
    return sum(o["stock"] for o in call("GET", f"{jackpot}/catalogue")["offers"])
before = stock()
ids = [call("POST", f"{doshii}/till", {})["id"] for _ in range(sales)]
deadline = time.monotonic() + wait_s
while True:
    records = {i: call("GET", f"{doshii}/requests/{i}") for i in ids}
    pending = [i for i, r in records.items() if r["status"] not in ("activated", "cancelled")]
    if not pending or time.monotonic() >= deadline:
        break
    time.sleep(1)
problems = []
for i, r in records.items():
    times = sum(e.get("status") == "activated" for e in r["logs"])
    status, reason = r["status"], r.get("cancelledReason") or ""
    if status != "activated" or times != 1:
        problems.append(f"request {i}: {status}, activated {times} times {reason}")
references = {r.get("reference") for r in records.values()}
print(json.dumps({"sales": sales, "activated_once": sales - len(problems),
                  "reserved": before - stock(), "references": len(references - {None}),
                  "problems": problems[:5], "request_ids": ids}))
'
step_till() {
    local started=$SECONDS why="" detail
    # The sale the sandbox makes at start (--till), logged once it ended.
    local deadline=$((SECONDS + TILL_TIMEOUT_S))
    until docker logs "$(cid sandbox)" 2>&1 | grep -q '"till sale"'; do
        ((SECONDS < deadline)) || { why="no till sale logged at start in ${TILL_TIMEOUT_S}s;"; break; }
        sleep 2
    done
    docker logs "$(cid sandbox)" 2>&1 | grep '"till sale"' | grep -q '"outcome": *"activated"' ||
        why="$why the start's till sale: $(docker logs "$(cid sandbox)" 2>&1 | grep '"till sale"' | head -c 300);"
    docker exec "$(cid sandbox)" python -c "$TILL_SCRIPT" "$TILL_SALES" "$TILL_TIMEOUT_S" \
        >"$WORK/till.json" 2>"$WORK/till.log"
    detail="$(python3 - "$WORK/till.json" "$TILL_SALES" <<'PY'
import json, sys
try:
    s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except (IndexError, ValueError):
    print("the till printed no summary"); sys.exit()
n = int(sys.argv[2])
if s["problems"] or s["activated_once"] != n or s["reserved"] != n or s["references"] != n:
    print(f"{s['activated_once']}/{n} activated once, {s['reserved']} vouchers reserved, "
          f"{s['references']} coupons: {'; '.join(s['problems'][:3])}")
PY
)"
    why="$why$detail"
    [[ -n "$why" ]] || why="$(ledger_lags "$WORK/till.json" request_id)"
    if [[ -n "$why" ]]; then
        record "2b till sales" FAIL $((SECONDS - started)) "$why"
        return 1
    fi
    record "2b till sales" PASS $((SECONDS - started)) "the start's sale and $TILL_SALES more activated once, one voucher reserved each, all $TILL_SALES activated in the ledger"
}

# 3. Scaled: consumers and connection names on the broker, every replica scraped.
step_scale() {
    local started=$SECONDS why="" args=(--scale "ingress=$INGRESS_SCALE")
    for role in "${!SCALE[@]}"; do args+=(--scale "$role=${SCALE[$role]}"); done
    if ! dc up -d --no-recreate "${args[@]}" "${SERVICES[@]}" >"$WORK/scale.log" 2>&1; then
        record "3 scaled" FAIL $((SECONDS - started)) "scale failed: $(tail -2 "$WORK/scale.log" | tr '\n' ' ')"
        return 1
    fi
    if ! why="$(wait_healthy)"; then
        record "3 scaled" FAIL $((SECONDS - started)) "not healthy: $why"
        return 1
    fi
    why=""
    local connections
    connections="$(rabbit_api connections | json "print('\n'.join(c.get('client_properties', {}).get('connection_name', '') for c in data))")"
    for role in "${QUEUED_ROLES[@]}"; do
        local consumers
        consumers="$(queue_field "$role" consumers)"
        [[ "$consumers" == "${SCALE[$role]}" ]] || why="$why $role: $consumers consumers, not ${SCALE[$role]};"
    done
    # Every replica that holds a broker connection names it (the sweeper holds none).
    local role want_replicas
    for role in ingress "${ROLES[@]}"; do
        local replicas=0 prefix="voucher-bridge worker $role"
        [[ "$role" != ingress ]] || prefix="voucher-bridge ingress"
        want_replicas="${SCALE[$role]:-$INGRESS_SCALE}"
        for id in $(containers "$role"); do
            replicas=$((replicas + 1))
            [[ "$role" != sweeper ]] || continue
            local host
            host="$(docker inspect -f '{{.Config.Hostname}}' "$id")"
            grep -q "^$prefix $host pid " <<<"$connections" ||
                why="$why no connection named for $role replica $host;"
        done
        [[ "$replicas" == "$want_replicas" ]] || why="$why $role: $replicas replicas, not $want_replicas;"
    done
    [[ -z "${COMPOSE_TEST_SCREENSHOT:-}" ]] || screenshot "$COMPOSE_TEST_SCREENSHOT" || why="$why screenshot failed;"
    # Prometheus finds replicas by DNS every 15 s and scrapes every 15 s.
    local deadline=$((SECONDS + SCRAPE_TIMEOUT_S)) scraped
    while true; do
        scraped="$(ops_get "http://$OPS:9090/api/v1/targets?state=active" | json "
from collections import Counter
up = Counter(t['labels'].get('role') for t in data['data']['activeTargets']
             if t['labels'].get('job') == 'workers' and t['health'] == 'up')
print(' '.join(f'{r}={n}' for r, n in sorted(up.items())))")"
        local want
        want="$(for r in $(printf '%s\n' "${!SCALE[@]}" | sort); do printf '%s=%s ' "$r" "${SCALE[$r]}"; done)"
        [[ "$scraped " == "$want" ]] && break
        if ((SECONDS >= deadline)); then
            why="$why Prometheus scrapes '$scraped', not '${want% }';"
            break
        fi
        sleep 3
    done
    if [[ -n "$why" ]]; then
        record "3 scaled" FAIL $((SECONDS - started)) "$why"
        return 1
    fi
    local counts=""
    for role in "${QUEUED_ROLES[@]}"; do counts="$counts $role ${SCALE[$role]}"; done
    record "3 scaled" PASS $((SECONDS - started)) "ingress x$INGRESS_SCALE; consumers$counts; one named connection per replica; Prometheus up: $scraped"
}

screenshot() { # file: the management UI's queues page, logged in, consumers shown
    local python=python3 expect=()
    [[ -x .venv/bin/python ]] && python=.venv/bin/python # aiohttp drives the browser
    for role in "${QUEUED_ROLES[@]}"; do expect+=(--expect "$NAMESPACE.$role"); done
    "$python" scripts/rabbitmq_screenshot.py "http://$OPS:15672" "$1" \
        --user "$RABBIT_USER" --password "$RABBIT_PASS" "${expect[@]}" >&2
}

# 4. Load; kill one replica of each worker role; restart RabbitMQ; every voucher activated once.
step_chaos() {
    local started=$SECONDS why killed=()
    start_load "$WORK/load4.json"
    sleep 3
    for service in "${BRIDGE_SERVICES[@]}"; do
        local victim
        victim="$(containers "$service" | tail -n1)"
        docker kill "$victim" >/dev/null && killed+=("$victim")
    done
    say "killed one replica of the ingress and of each worker role: ${killed[*]}"
    sleep 3
    say "restarting the RabbitMQ container"
    docker restart "$(cid rabbitmq)" >/dev/null
    # Bring back the killed replicas (a killed container is not restarted by its policy).
    for victim in "${killed[@]}"; do docker start "$victim" >/dev/null; done
    why="$(finish_load "$WORK/load4.json")"
    [[ -n "$why" ]] || why="$(wait_settled)"
    [[ -n "$why" ]] || why="$(ledger_lags "$WORK/load4.json")"
    if [[ -n "$why" ]]; then
        record "4 kill + broker restart" FAIL $((SECONDS - started)) "$why"
        return 1
    fi
    record "4 kill + broker restart" PASS $((SECONDS - started)) "ingress x$INGRESS_SCALE; killed 1 replica of each of ${BRIDGE_SERVICES[*]}; $(load_detail "$WORK/load4.json"), $(spooled) spooled by the ingress meanwhile; queues empty, no dead letters"
}

# 5. `stop` every bridge service under load: exit 0 within the grace period; then nothing lost.
step_stop() {
    local started=$SECONDS why="" ids=() stopping_at took
    start_load "$WORK/load5.json"
    sleep 4
    for service in "${BRIDGE_SERVICES[@]}"; do ids+=($(containers "$service")); done
    stopping_at=$SECONDS
    dc stop "${BRIDGE_SERVICES[@]}" >/dev/null 2>&1
    took=$((SECONDS - stopping_at))
    for id in "${ids[@]}"; do
        local code name
        read -r name code <<<"$(docker inspect -f '{{.Name}} {{.State.ExitCode}}' "$id")"
        [[ "$code" == 0 ]] || why="$why ${name#/} exited $code;"
    done
    ((took < GRACE_S)) || why="$why stop took ${took}s;"
    dc start "${BRIDGE_SERVICES[@]}" >/dev/null 2>&1
    local lost
    lost="$(finish_load "$WORK/load5.json")"
    [[ -n "$lost" ]] || lost="$(wait_settled)"
    [[ -n "$lost" ]] || lost="$(ledger_lags "$WORK/load5.json")"
    why="$why$lost"
    if [[ -n "$why" ]]; then
        record "5 stop under load" FAIL $((SECONDS - started)) "$why"
        return 1
    fi
    record "5 stop under load" PASS $((SECONDS - started)) "${#ids[@]} processes exited 0, stop took ${took}s (grace ${GRACE_S}s); $(load_detail "$WORK/load5.json")"
}

# 5b. The ingress scaled to 3 behind the load balancer: every replica takes part, is scraped.
step_ingress_scale() {
    local started=$SECONDS why="" args=(--scale ingress=3) before=() ids=()
    for role in "${!SCALE[@]}"; do args+=(--scale "$role=${SCALE[$role]}"); done
    if ! dc up -d --no-recreate "${args[@]}" "${SERVICES[@]}" >"$WORK/scale-ingress.log" 2>&1; then
        record "5b ingress x3 behind lb" FAIL $((SECONDS - started)) "scale failed: $(tail -2 "$WORK/scale-ingress.log" | tr '\n' ' ')"
        return 1
    fi
    if ! why="$(wait_healthy)"; then
        record "5b ingress x3 behind lb" FAIL $((SECONDS - started)) "not healthy: $why"
        return 1
    fi
    why=""
    mapfile -t ids < <(containers ingress)
    ((${#ids[@]} == 3)) || why="$why ${#ids[@]} ingress replicas;"
    # HAProxy and Prometheus both find replicas by DNS: wait until Prometheus has all three.
    local deadline=$((SECONDS + SCRAPE_TIMEOUT_S)) scraped=0
    until ((scraped == 3)); do
        scraped="$(ops_get "http://$OPS:9090/api/v1/targets?state=active" | json "
print(sum(t['labels'].get('job') == 'ingress' and t['health'] == 'up' for t in data['data']['activeTargets']))")"
        ((SECONDS < deadline)) || { why="$why Prometheus scrapes $scraped ingress replicas;"; break; }
        ((scraped == 3)) || sleep 3
    done
    for id in "${ids[@]}"; do before+=("$(answered "$id" accepted)"); done
    start_load "$WORK/load5b.json"
    local lost
    lost="$(finish_load "$WORK/load5b.json")"
    [[ -n "$lost" ]] || lost="$(ledger_lags "$WORK/load5b.json")"
    why="$why$lost"
    local shares=() index=0
    for id in "${ids[@]}"; do
        local took=$(($(answered "$id" accepted) - before[index]))
        shares+=("$took")
        ((took > 0)) || why="$why replica $(docker inspect -f '{{.Config.Hostname}}' "$id") took none;"
        index=$((index + 1))
    done
    if [[ -n "$why" ]]; then
        record "5b ingress x3 behind lb" FAIL $((SECONDS - started)) "$why"
        return 1
    fi
    record "5b ingress x3 behind lb" PASS $((SECONDS - started)) "accepted per replica ${shares[*]}, 3 scraped; $(load_detail "$WORK/load5b.json")"
}

# 6. down -v: nothing of the project left.
step_down() {
    local started=$SECONDS left step="${1:-6 down -v}"
    dc down -v --remove-orphans >/dev/null 2>&1
    DOWN_DONE=1
    left="$(
        docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"
        docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT"
        docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"
    )"
    if [[ -n "$left" ]]; then
        record "$step" FAIL $((SECONDS - started)) "left: $(echo "$left" | tr '\n' ' ')"
        return 1
    fi
    record "$step" PASS $((SECONDS - started)) "no container, volume or network left"
}

# 7. Three RabbitMQ nodes (compose.cluster.yaml): one cluster, queues on every node, a node lost.
step_cluster() {
    local started=$SECONDS why="" nodes=(rabbitmq rabbitmq-2 rabbitmq-3)
    PROJECT="$PROJECT-cluster"
    FILES+=(-f compose.cluster.yaml)
    DOWN_DONE=""
    export RABBITMQ_ERLANG_COOKIE="${RABBITMQ_ERLANG_COOKIE:-$(python3 -c 'import secrets; print(secrets.token_hex(20))')}"
    dc down -v --remove-orphans >/dev/null 2>&1
    if ! dc up -d "${SERVICES[@]}" rabbitmq-2 rabbitmq-3 >"$WORK/cluster.log" 2>&1; then
        record "7 three-node cluster" FAIL $((SECONDS - started)) "up failed: $(tail -2 "$WORK/cluster.log" | tr '\n' ' ')"
        return 1
    fi
    if ! why="$(wait_healthy)"; then
        record "7 three-node cluster" FAIL $((SECONDS - started)) "not healthy: $why"
        return 1
    fi
    why=""
    local running
    running="$(rabbit_api nodes | json "print(sum(n['running'] for n in data))")"
    [[ "$running" == 3 ]] || why="$why $running nodes running;"
    members() { rabbit_api "queues/%2F/$NAMESPACE.$1" | json "print(len(data.get('members', [])))"; }
    for role in "${QUEUED_ROLES[@]}"; do
        [[ "$(members "$role")" == 3 ]] || why="$why $role has $(members "$role") members;"
    done
    # The bridge's connections are on the first node (BRIDGE_AMQP_URL): lose another one.
    start_load "$WORK/load7.json"
    sleep 3
    dc stop "${nodes[2]}" >/dev/null 2>&1
    local lost
    lost="$(finish_load "$WORK/load7.json")"
    [[ -n "$lost" ]] || lost="$(ledger_lags "$WORK/load7.json")"
    why="$why$lost"
    dc start "${nodes[2]}" >/dev/null 2>&1
    wait_healthy >/dev/null || why="$why ${nodes[2]} did not come back;"
    running="$(rabbit_api nodes | json "print(sum(n['running'] for n in data))")"
    [[ "$running" == 3 ]] || why="$why $running nodes running after the restart;"
    if [[ -n "$why" ]]; then
        record "7 three-node cluster" FAIL $((SECONDS - started)) "$why"
        return 1
    fi
    record "7 three-node cluster" PASS $((SECONDS - started)) "3 nodes, every work queue on all 3; ${nodes[2]} stopped under load: $(load_detail "$WORK/load7.json")"
}

say "project $PROJECT, ${COMPOSE[*]}, ops on $OPS"
STACK_OK=""
if step_up && step_story && step_till && step_scale; then
    STACK_OK=1
    step_chaos
    step_stop
    step_ingress_scale
fi
if [[ -n "${COMPOSE_TEST_KEEP:-}" ]]; then
    say "COMPOSE_TEST_KEEP: the stack stays up (${COMPOSE[*]} -p $PROJECT --profile demo down -v)"
else
    step_down
    # The cluster only once the single-broker stack has come up: its failures would repeat.
    if [[ -n "$STACK_OK" && "${COMPOSE_TEST_CLUSTER:-1}" != 0 ]]; then
        step_cluster
        step_down "7 cluster down -v"
    fi
fi
print_table
((FAILED == 0))
