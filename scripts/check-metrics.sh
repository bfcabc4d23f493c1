#!/usr/bin/env bash
# The operations kit against the real thing, with promtool (installed when missing):
#   - deploy/prometheus/alerts.yml is valid (`promtool check rules`) and its unit tests
#     pass (`promtool test rules alerts_test.yml`);
#   - every query of deploy/grafana/forgemq.json is valid PromQL;
#   - a private redis-server, `forgemq serve` and `forgemq gateway` (tiny config below)
#     with some traffic, the gateway consuming (so the worker gauges are non-zero): both
#     /metrics pass `promtool check metrics` with no problem reported, their OpenMetrics
#     and text answers carry the same samples, and every ForgeMQ metric the alerts and
#     the dashboard use is there.
# Any problem fails the run. Takes a few seconds beyond building the binary.
#
# Env: FORGEMQ_BIN (default: builds the debug binary under $CARGO_TARGET_DIR or target/).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-redis.sh
scripts/ensure-promtool.sh

fail() { echo "check-metrics: $*" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- Static: the rules, their tests, the dashboard's queries. -------------------------
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
# Each dashboard query as a recording rule, with Grafana's variables filled in, so that
# promtool parses it.
python3 - deploy/grafana/forgemq.json >"$work/dashboard-rules.yml" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
subst = {"$__rate_interval": "5m", "$gateway_job": ".*", "$job": ".*", "$topic": ".*"}
print("groups:\n  - name: dashboard\n    rules:")
for i, e in enumerate(exprs):
    for k, v in subst.items():
        e = e.replace(k, v)
    print(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}")
PY
promtool check rules "$work/dashboard-rules.yml" >/dev/null ||
  fail "a query of deploy/grafana/forgemq.json is not valid PromQL (promtool check rules $work/dashboard-rules.yml)"
echo "deploy/grafana/forgemq.json: $(grep -c 'record:' "$work/dashboard-rules.yml") queries parse"

# --- Live: serve and the gateway on a private Redis. ----------------------------------
if [ -z "${FORGEMQ_BIN:-}" ]; then
  cargo build --quiet -p forgemq-cli --bin forgemq
  FORGEMQ_BIN=${CARGO_TARGET_DIR:-target}/debug/forgemq
fi
FORGEMQ_BIN=$(realpath "$FORGEMQ_BIN")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
  --logfile "$work/redis.log" &
pids+=($!)
export REDIS_URL="redis://127.0.0.1:$redis_port/"
unset FORGEMQ_TOKEN FORGEMQ_REPLICAS FORGEMQ_REPLICAS_TIMEOUT FORGEMQ_LOG_FORMAT
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

# A route that takes everything, one whose command always fails (straight to the dead
# letters), and a topic nobody consumes (pending, with a queue latency).
cat >"$work/gateway.toml" <<'TOML'
[[routes]]
topic = "ops.ok"
exec = ["sh", "-c", "cat > /dev/null"]
concurrency = 2

[[routes]]
topic = "ops.fail"
exec = ["sh", "-c", "cat > /dev/null; exit 1"]
max_retry = 0
TOML

api_port=$(free_port)
gateway_port=$(free_port)
"$FORGEMQ_BIN" serve --bind "127.0.0.1:$api_port" 2>"$work/serve.log" &
pids+=($!)
"$FORGEMQ_BIN" gateway --config "$work/gateway.toml" --listen "127.0.0.1:$gateway_port" \
  2>"$work/gateway.log" &
pids+=($!)

wait_for() { # wait_for WHAT COMMAND...: up to 20 s
  local what=$1; shift
  for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "--- serve.log" >&2; cat "$work/serve.log" >&2
  echo "--- gateway.log" >&2; cat "$work/gateway.log" >&2
  fail "timed out waiting for $what"
}
wait_for "serve's /readyz" curl -fsS "http://127.0.0.1:$api_port/readyz"
wait_for "the gateway's /readyz" curl -fsS "http://127.0.0.1:$gateway_port/readyz"

for i in 1 2 3; do "$FORGEMQ_BIN" publish ops.ok "{\"n\": $i}" >/dev/null; done
for i in 1 2; do "$FORGEMQ_BIN" publish ops.fail "{\"n\": $i}" >/dev/null; done
for i in 1 2; do "$FORGEMQ_BIN" publish ops.idle "{\"n\": $i}" >/dev/null; done
# A schedule that fired once (run now), for the schedule families.
"$FORGEMQ_BIN" schedule set ops.nightly --cron "0 3 * * *" --topic ops.report >/dev/null
"$FORGEMQ_BIN" schedule run ops.nightly >/dev/null
"$FORGEMQ_BIN" limit set ops.idle 50/s --burst 5 >/dev/null

scrape() { curl -fsS "http://127.0.0.1:$1/metrics"; }
# Not grep -q: it would stop reading early, and curl's broken pipe fail the pipeline.
has() { scrape "$api_port" | grep -xF "$1" >/dev/null; }
wait_for "ops.ok processed" has 'forgemq_processed_total{topic="ops.ok"} 3'
wait_for "ops.fail dead-lettered" has 'forgemq_dead_total{topic="ops.fail"} 2'
wait_for "the gateway in the worker registry" has 'forgemq_workers{topic="ops.ok"} 1'
wait_for "the rate limit" has 'forgemq_rate_limit_burst{topic="ops.idle"} 5'
wait_for "the schedule's count" has 'forgemq_schedule_fired_total{schedule="ops.nightly",topic="ops.report"} 1'

scrape "$api_port" >"$work/serve.prom"
scrape "$gateway_port" >"$work/gateway.prom"
openmetrics='Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5'
curl -fsS -H "$openmetrics" "http://127.0.0.1:$api_port/metrics" >"$work/serve.om"
curl -fsS -H "$openmetrics" "http://127.0.0.1:$gateway_port/metrics" >"$work/gateway.om"

status=0
for name in serve gateway; do
  # promtool exits non-zero on a parse error or a lint problem, and prints problems.
  if ! problems=$(promtool check metrics <"$work/$name.prom" 2>&1) || [ -n "$problems" ]; then
    echo "promtool check metrics: $name's /metrics:" >&2
    echo "$problems" >&2
    status=1
  else
    echo "promtool check metrics: $name's /metrics: no problems ($(grep -vc '^#' "$work/$name.prom") samples)"
  fi
  # The same series in both formats (only the family lines differ; ages move on).
  series() { grep -v '^#' "$1" | sed 's/ [^ ]*$//' | sort; }
  if ! diff <(series "$work/$name.prom") <(series "$work/$name.om") >&2; then
    echo "$name: the OpenMetrics and text answers carry different samples" >&2
    status=1
  fi
done

# Non-zero where the traffic above says so.
for line in \
  'forgemq_redis_up 1' \
  'forgemq_workers{topic="ops.ok"} 1' \
  'forgemq_worker_slots{topic="ops.ok"} 2' \
  'forgemq_messages{topic="ops.idle",state="pending"} 2' \
  'forgemq_gateway_consumers{route="ops.ok"} 1' \
  'forgemq_gateway_failures_total{route="ops.fail",topic="ops.fail"} 2'; do
  if ! grep -qxF "$line" "$work/serve.prom" "$work/gateway.prom" -h; then
    echo "missing: $line" >&2
    status=1
  fi
done
age=$(sed -n 's/^forgemq_oldest_pending_age_seconds{topic="ops.idle"} //p' "$work/serve.prom")
awk -v a="${age:-0}" 'BEGIN { exit !(a > 0) }' || { echo "ops.idle has no queue latency: '$age'" >&2; status=1; }

# Every ForgeMQ metric the alerts and the dashboard use is exported.
for metric in $(grep -ohE '\bforgemq_[a-z_]+' deploy/prometheus/alerts.yml deploy/grafana/forgemq.json | sort -u); do
  if ! grep -qE "^$metric(_bucket|_sum|_count)?(\{| )" "$work/serve.prom" "$work/gateway.prom"; then
    echo "deploy/ uses $metric, which neither /metrics exports" >&2
    status=1
  fi
done

[ "$status" = 0 ] || fail "problems above"
echo "check-metrics: all good"
