#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: N processes joined by jax.distributed over localhost, each
# with its own devices, each reading its own slice of the data (the way hosts of a pod do).
#   bash launch/multiprocess_local.sh N [configs/x.yaml] [key=value ...]
# ELVA_PORT picks the coordinator port (default: a random free-looking one). If any process fails, the
# others are stopped (they would otherwise wait in a collective forever) and the first failure's exit
# status is returned. Output lines are prefixed with the process id.
set -uo pipefail
n="${1:?usage: multiprocess_local.sh N [config.yaml] [key=value ...]}"; shift
args=()
if [ $# -gt 0 ] && [[ "$1" == *.yaml ]]; then args=(--config "$1"); shift; fi
port="${ELVA_PORT:-$((20000 + RANDOM % 20000))}"
pids=()
for ((i = 0; i < n; i++)); do
  ELVA_COORDINATOR_ADDRESS="localhost:$port" ELVA_NUM_PROCESSES="$n" ELVA_PROCESS_ID="$i" \
    python -m elva_jax.train "${args[@]}" "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
done
status=0
left=${#pids[@]}
while [ "$left" -gt 0 ]; do
  sleep 0.5
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"; rc=$?
    unset 'pids[i]'; left=$((left - 1))
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      echo "[multiprocess_local] process $i exited with status $rc; stopping the others" >&2
      kill "${pids[@]}" 2>/dev/null  # SIGTERM first: they may be waiting in a collective, so then SIGKILL
      (sleep 20; kill -KILL "${pids[@]}" 2>/dev/null) &
    fi
  done
done
exit "$status"
