#!/usr/bin/env bash
# faust-streaming evaluation for issue 16. Usage: bench/faust_eval/run.sh [install|up|smoke|durability|tput|crash|rebalance|latency|down|all]
# Needs: python3.11; the project venv (/work/main/.venv: confluent_kafka for tools.py, `sluice up`).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
FV=${FAUST_VENV:-/tmp/faust-venv}
PY=$ROOT/.venv/bin/python
LOGS=${FE_LOGS:-/tmp/fe-logs}; mkdir -p "$LOGS"
STACK_ENV=(SLUICE_STATE_DIR=/tmp/faust-stack SLUICE_KAFKA_PORT=39092 SLUICE_KAFKA_CONTROLLER_PORT=39093 SLUICE_REDIS_PORT=36379)
cd "$HERE"

install() {
  python3.11 -m venv "$FV" && "$FV/bin/pip" install -q -U pip && "$FV/bin/pip" install faust-streaming
  "$FV/bin/pip" show faust-streaming aiokafka mode-streaming | grep -E '^(Name|Version|Requires)'
  # can it share the project's venv? (dry runs in a throwaway venv)
  python3.11 -m venv /tmp/fe-throwaway && /tmp/fe-throwaway/bin/pip install -q -U pip
  /tmp/fe-throwaway/bin/pip install --dry-run faust-streaming aiokafka==0.14.0 confluent-kafka==2.16.2 | tail -1
  "$PY" -m pip freeze | grep -v -e '^-e' -e '@ file' -e '^sluice' > /tmp/fe-proj-freeze.txt
  /tmp/fe-throwaway/bin/pip install --dry-run faust-streaming -c /tmp/fe-proj-freeze.txt 2>&1 | grep -A4 'conflict is caused'
}
up()   { (cd "$ROOT" && env "${STACK_ENV[@]}" "$ROOT/.venv/bin/sluice" up); }
down() { (cd "$ROOT" && env "${STACK_ENV[@]}" "$ROOT/.venv/bin/sluice" down); }

# start_worker NAME RUN [env...]: background worker, pid in $LOGS/NAME.pid, waits for "Worker ready"
start_worker() {
  local name=$1 run=$2; shift 2
  env FE_RUN="$run" "$@" nohup "$FV/bin/python" admission_app.py worker -l info \
    --web-port "${WEB_PORT:-6066}" > "$LOGS/$name.log" 2>&1 &
  echo $! > "$LOGS/$name.pid"
  local t0=$(date +%s.%N)
  for _ in $(seq 1 400); do grep -q "Worker ready" "$LOGS/$name.log" && break; sleep 0.25; done
  echo "[$name] ready after $(echo "$(date +%s.%N)-$t0" | bc) s (pid $(cat "$LOGS/$name.pid"))"
}
stop_worker() { # stop_worker NAME [SIGNAL]
  local pid; pid=$(cat "$LOGS/$1.pid"); kill -"${2:-TERM}" "$pid" 2>/dev/null
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
}
recovery_lines() { grep -E "Restoring state|Done reading from changelog|Worker ready|ERROR|WARN|Crash|fenced" "$LOGS/$1.log" | cut -c1-220 | head -${2:-12}; }
txn_flags() { # isTransactional counts of a topic's segments (DumpLogSegments from the stack's jars)
  for d in /tmp/faust-stack/kafka/data/$1-*; do
    java -cp "/tmp/faust-stack/kafka/libs/*" kafka.tools.DumpLogSegments --files "$(ls "$d"/*.log | head -1)" 2>/dev/null
  done | grep -oE "isTransactional: (true|false)|isControl: true" | sort | uniq -c | tr '\n' ' '; echo " <- $1"
}

smoke() { # 200 requests, 2 tenants, limit 30/min, exactly_once; shows which topics get transactional batches
  $PY tools.py topics smoke
  start_worker smoke smoke FE_GUARANTEE=exactly_once FE_LIMIT=30
  $PY tools.py produce smoke --n 200 --tenants 2
  $PY tools.py check smoke --expect 200 --idle 5
  stop_worker smoke
  txn_flags fe.admitted.smoke; txn_flags fe.results.smoke; txn_flags fe-admission.smoke-tenant_state-changelog
}
durability() { # SIGTERM + restart: does tenant t0's counter continue (seq 101..110)?
  start_worker smoke2 smoke FE_GUARANTEE=exactly_once FE_LIMIT=30; recovery_lines smoke2
  $PY tools.py produce smoke --n 10 --tenant t0 --start 200
  $PY tools.py check smoke --expect 210 --idle 5
  stop_worker smoke2
}
tput() { # 20,000 requests produced as fast as possible, one instance, per guarantee
  for g in exactly_once at_least_once; do
    r=tput-${g%%_*}; $PY tools.py topics $r
    start_worker $r $r FE_GUARANTEE=$g
    $PY tools.py produce $r --n 20000 --tenants 50
    $PY tools.py check $r --expect 20000 --idle 8 --timeout 300
    stop_worker $r
    # restart: recovery time of a 20k-update changelog
    start_worker $r-restart $r FE_GUARANTEE=$g; recovery_lines $r-restart 8; stop_worker $r-restart
  done
}
crash() { # kill -9 mid-stream, restart at once; count ids with a read_committed consumer
  for g in exactly_once at_least_once; do
    r=crash-${g%%_*}; $PY tools.py topics $r
    start_worker $r $r FE_GUARANTEE=$g
    $PY tools.py produce $r --n 10000 --tenants 50 --rate 1000 & ppid=$!
    sleep 5; stop_worker $r KILL; echo "[$r] killed -9 at +5 s"
    start_worker $r-after $r FE_GUARANTEE=$g; recovery_lines $r-after 10
    wait $ppid
    $PY tools.py check $r --expect 10000 --idle 10 --timeout 300
    $PY tools.py check $r --expect 10000 --idle 5 --timeout 300 --isolation read_uncommitted
    stop_worker $r-after
  done
}
rebalance() { # two instances, then kill one (SIGTERM, then kill -9 with a 10 s session timeout)
  # REB_G=at_least_once REB_SIGS=TERM ./run.sh rebalance   for the at-least-once variant
  local g=${REB_G:-exactly_once}
  for sig in ${REB_SIGS:-TERM KILL}; do
    r=reb-$sig; [ "$g" = exactly_once ] || r=reb-alo-$sig; $PY tools.py topics $r
    WEB_PORT=6066 start_worker $r-a $r FE_GUARANTEE=$g FE_SESSION_TIMEOUT=10
    WEB_PORT=6067 start_worker $r-b $r FE_GUARANTEE=$g FE_SESSION_TIMEOUT=10
    sleep 5
    $PY tools.py produce $r --n 12000 --tenants 50 --rate 600 & ppid=$!
    sleep 8; stop_worker $r-b $sig; echo "[$r] instance b stopped with SIG$sig at +8 s"
    wait $ppid
    $PY tools.py check $r --expect 12000 --idle 15 --timeout 240
    recovery_lines $r-a 30
    stop_worker $r-a
  done
}
latency() { # open-loop 500/s for 15 s; latency = arrival at a live read_committed consumer - request ts
  for g in exactly_once at_least_once; do
    for ci in 2.8 0.2; do
      r=lat-${g%%_*}-${ci/./}; $PY tools.py topics $r
      start_worker $r $r FE_GUARANTEE=$g FE_COMMIT_INTERVAL=$ci
      $PY tools.py check $r --expect 7500 --idle 6 --timeout 120 & cpid=$!
      sleep 2; $PY tools.py produce $r --n 7500 --tenants 50 --rate 500
      wait $cpid; stop_worker $r
    done
  done
}

case "${1:-all}" in
  all) install; up; smoke; durability; tput; crash; rebalance; latency; down ;;
  *) "$@" ;;
esac
