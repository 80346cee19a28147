#!/usr/bin/env bash
# Usage: tests/slurm/down.sh
# Stop the single-node Slurm started by tests/slurm/up.sh: cancel its jobs, then stop
# slurmd, slurmctld and (if up.sh started it) munged, by the pid files in
# $HPCRUN_SLURM_DIR (default /tmp/hpcrun-slurm). Idempotent; keeps config, state and logs.
set -euo pipefail

readonly STATE_DIR="${HPCRUN_SLURM_DIR:-/tmp/hpcrun-slurm}"
export SLURM_CONF="$STATE_DIR/slurm.conf"

alive() { # alive PIDFILE: the process named in PIDFILE is running
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

cancel_jobs() { # so no slurmstepd outlives slurmd
  alive "$STATE_DIR/slurmctld.pid" || return 0
  scancel --partition=debug 2>/dev/null || true
  local deadline=$((SECONDS + 20))
  while [[ -n "$(squeue -h -t running,completing -o %i 2>/dev/null)" ]] && ((SECONDS < deadline)); do
    sleep 0.5
  done
}

stop() { # stop NAME...: TERM the processes in STATE_DIR/NAME.pid, KILL them after 10 s
  local name pids=() tries
  for name in "$@"; do
    if alive "$STATE_DIR/$name.pid"; then
      pids+=("$(cat "$STATE_DIR/$name.pid")")
    fi
  done
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((tries = 0; tries < 100; tries++)); do
      kill -0 "${pids[@]}" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  for name in "$@"; do
    rm -f "$STATE_DIR/$name.pid"
  done
}

main() {
  cancel_jobs
  stop slurmd slurmctld munged
  echo "slurm: down"
}

main "$@"
