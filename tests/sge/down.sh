#!/usr/bin/env bash
# Usage: tests/sge/down.sh
# Stop the single-node Grid Engine started by tests/sge/up.sh: delete every job (running,
# waiting or in error), then stop sge_execd (qconf -ke) and sge_qmaster (qconf -km), and
# wait until they are gone (TERM, then KILL, by the
# daemons' pid files if they linger). Idempotent; keeps the packages, cell and accounting.
set -euo pipefail

readonly SPOOL=/var/spool/gridengine
readonly WAIT_SECONDS=20
export SGE_ROOT="${SGE_ROOT:-/var/lib/gridengine}"
export SGE_CELL="${SGE_CELL:-default}"
NODE="$(hostname)"
readonly NODE
readonly QMASTER_PID="$SPOOL/qmaster/qmaster.pid"

alive() { # alive PIDFILE: the process named in PIDFILE is running
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

execd_pidfiles() { # execd spools in a directory named as it resolves itself (here: localhost)
  local pidfile
  for pidfile in "$SPOOL"/execd/*/execd.pid; do
    if alive "$pidfile"; then
      echo "$pidfile"
    fi
  done
}

running_jobs() { # what qstat lists, and the jobs' sge_shepherd processes (execd's children)
  qstat -u '*' 2>/dev/null || true
  pgrep -x sge_shepherd 2>/dev/null || true
}

wait_gone() { # wait_gone PIDFILE: until its process exits, WAIT_SECONDS at most
  local deadline=$((SECONDS + WAIT_SECONDS))
  while alive "$1" && ((SECONDS < deadline)); do
    sleep 0.2
  done
  ! alive "$1"
}

stop() { # stop PIDFILE: TERM, then KILL after 10 s, the process in PIDFILE
  local pid tries
  alive "$1" || return 0
  pid="$(cat "$1")"
  kill -TERM "$pid" 2>/dev/null || true
  for ((tries = 0; tries < 100; tries++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

delete_jobs() { # so that no job's processes outlive execd
  alive "$QMASTER_PID" || return 0
  qdel -f -u '*' >/dev/null 2>&1 || true
  local deadline=$((SECONDS + WAIT_SECONDS))
  while [[ -n "$(running_jobs)" ]] && ((SECONDS < deadline)); do
    sleep 0.2
  done
}

main() {
  local pidfile
  delete_jobs
  for pidfile in $(execd_pidfiles); do
    if alive "$QMASTER_PID"; then
      qconf -ke "$NODE" >/dev/null 2>&1 || true
    fi
    wait_gone "$pidfile" || stop "$pidfile"
  done
  if alive "$QMASTER_PID"; then
    qconf -km >/dev/null 2>&1 || true
    wait_gone "$QMASTER_PID" || stop "$QMASTER_PID"
  fi
  echo "sge: down"
}

main "$@"
