#!/usr/bin/env bash
# Usage: ./hpcrun.sh <command> [<args>]
#
#   monitor [DIR...] [-- OPTIONS]  start `hpcrun.py monitor` in the background (alias: start)
#   stop                           stop it: TERM, up to 10 s, then KILL
#   status                         monitors on all login nodes; exit 0 running here,
#                                  1 dead with a pid file, 3 not running
#   log [-f]                       show the last 50 lines of its log, or follow it
#   cron [DIR...] [-- OPTIONS]     print a crontab line that runs `monitor --once` every 5 min
#   help                           show this text (no command: the same, exit status 2)
#
# OPTIONS go to hpcrun.py unchanged, e.g. `-- --interval 120 --config ~/hpcrun.ini`.
# The pid file and log live in ${HPCRUN_HOME:-~/.hpcrun}, named after this host, because
# $HOME is shared between login nodes: a monitor started on login1 is invisible on login2.
# Environment: HPCRUN_PYTHON (default python3), HPCRUN_HOME (default ~/.hpcrun).
# All real logic is in hpcrun.py, which must sit next to this script.

set -euo pipefail

script_path="$(readlink -f -- "${BASH_SOURCE[0]}")"
readonly SCRIPT_PATH="$script_path"
readonly HPCRUN_PY="${SCRIPT_PATH%/*}/hpcrun.py"
readonly PY="${HPCRUN_PYTHON:-python3}"
readonly STATE_DIR="${HPCRUN_HOME:-$HOME/.hpcrun}"
readonly HOST="${HOSTNAME%%.*}"
readonly PID_FILE="$STATE_DIR/monitor.$HOST.pid"
readonly LOG_FILE="$STATE_DIR/monitor.$HOST.log"
readonly STOP_TIMEOUT=10
readonly LOG_ROTATE_BYTES=$((10 * 1024 * 1024))

die() {
  echo "hpcrun.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '/^# Usage:/,/^[^#]/{/^#/s/^# \{0,1\}//p;}' "$SCRIPT_PATH"
}

# The pid in the pid file, or nothing.
read_pid() {
  local pid=""
  if [[ -f "$PID_FILE" ]]; then
    read -r pid <"$PID_FILE" || true
  fi
  if [[ "$pid" =~ ^[0-9]+$ ]]; then
    echo "$pid"
  fi
}

# True if PID is alive and really is hpcrun's monitor (pids get reused).
is_monitor() {
  local pid="$1" cmdline
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/cmdline" ]]; then
    cmdline="$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null)" || return 1
  else
    cmdline="$(ps -p "$pid" -o args= 2>/dev/null)" || return 1
  fi
  [[ "$cmdline" == *"$HPCRUN_PY monitor"* ]]
}

# POSIX shell quoting ('...'), which cron's /bin/sh (dash) reads as bash does.
sh_quote() {
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

# Turn "[DIR...] [-- OPTIONS]" into hpcrun.py monitor arguments in the array MONITOR_ARGS.
parse_monitor_args() {
  MONITOR_ARGS=()
  while (($#)); do
    case "$1" in
      --)
        shift
        MONITOR_ARGS+=("$@")
        return
        ;;
      -*) die "unknown option '$1' (put hpcrun.py options after '--')" ;;
      *)
        [[ -d "$1" ]] || die "work dir '$1' does not exist"
        MONITOR_ARGS+=(--work-dir "$(readlink -m -- "$1")")
        ;;
    esac
    shift
  done
}

cmd_monitor() {
  local pid offset
  [[ -f "$HPCRUN_PY" ]] || die "cannot find '$HPCRUN_PY'"
  parse_monitor_args "$@"
  mkdir -p "$STATE_DIR"
  pid="$(read_pid)"
  if [[ -n "$pid" ]] && is_monitor "$pid"; then
    die "monitor already running on $HOST (pid $pid); stop it first with './hpcrun.sh stop'"
  fi
  if [[ -f "$PID_FILE" ]]; then
    echo "removing stale pid file '$PID_FILE'"
    rm -f "$PID_FILE"
  fi
  if [[ -f "$LOG_FILE" ]] && (($(wc -c <"$LOG_FILE") > LOG_ROTATE_BYTES)); then
    mv -f "$LOG_FILE" "$LOG_FILE.1"
  fi
  offset=0
  [[ -f "$LOG_FILE" ]] && offset="$(wc -c <"$LOG_FILE")"
  PYTHONUNBUFFERED=1 PYTHONIOENCODING="${PYTHONIOENCODING:-utf-8}" \
    nohup "$PY" "$HPCRUN_PY" monitor "${MONITOR_ARGS[@]}" </dev/null >>"$LOG_FILE" 2>&1 &
  pid=$!
  echo "$pid" >"$PID_FILE"
  # Wait until it has logged its start (config read, channels checked) or died.
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    tail -c "+$((offset + 1))" "$LOG_FILE" | grep -q "monitor started" && break
    sleep 0.1
  done
  if ! is_monitor "$pid"; then
    rm -f "$PID_FILE"
    echo "hpcrun.sh: monitor exited at once; its log says:" >&2
    tail -c "+$((offset + 1))" "$LOG_FILE" | tail -n 20 >&2
    exit 1
  fi
  echo "monitor started on $HOST (pid $pid), log: $LOG_FILE"
}

cmd_stop() {
  local pid waited=0
  pid="$(read_pid)"
  if [[ -z "$pid" ]] || ! is_monitor "$pid"; then
    rm -f "$PID_FILE"
    echo "no monitor running on $HOST"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  while is_monitor "$pid" && ((waited < STOP_TIMEOUT * 5)); do
    sleep 0.2
    waited=$((waited + 1))
  done
  if is_monitor "$pid"; then
    echo "monitor (pid $pid) did not stop after ${STOP_TIMEOUT}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE"
  echo "monitor stopped (pid $pid)"
}

cmd_status() {
  local pid
  # Monitors on every login node, from their heartbeat files (a login alias hides them).
  HPCRUN_HOME="$STATE_DIR" "$PY" "$HPCRUN_PY" status --monitors || true
  pid="$(read_pid)"
  if [[ -n "$pid" ]] && is_monitor "$pid"; then
    echo "monitor running on $HOST (pid $pid), log: $LOG_FILE"
    return 0
  fi
  if [[ -f "$PID_FILE" ]]; then
    echo "monitor dead on $HOST (pid file '$PID_FILE' names ${pid:-nothing}), log: $LOG_FILE"
    return 1
  fi
  echo "monitor not running on $HOST"
  return 3
}

cmd_log() {
  [[ -f "$LOG_FILE" ]] || die "no log yet: '$LOG_FILE'"
  case "${1:-}" in
    "") tail -n 50 "$LOG_FILE" ;;
    -f) tail -n 50 -f "$LOG_FILE" ;;
    *) die "unknown option '$1' (usage: ./hpcrun.sh log [-f])" ;;
  esac
}

cmd_cron() {
  local python line arg
  parse_monitor_args "$@"
  python="$("$PY" -c 'import sys; print(sys.executable)')" || die "cannot run '$PY'"
  mkdir -p "$STATE_DIR"
  line="*/5 * * * * cd $(sh_quote "${SCRIPT_PATH%/*}") &&"
  for arg in "$python" "$HPCRUN_PY" monitor --once "${MONITOR_ARGS[@]}"; do
    line+=" $(sh_quote "$arg")"
  done
  line+=" >>$(sh_quote "$STATE_DIR/cron.$HOST.log") 2>&1"
  echo "# add with 'crontab -e' on $HOST (cron has a bare PATH, so every path is absolute):"
  echo "${line//%/\\%}"
}

main() {
  case "${1:-}" in
    monitor | start) shift && cmd_monitor "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    log) shift && cmd_log "$@" ;;
    cron) shift && cmd_cron "$@" ;;
    help | -h | --help) usage ;;
    "")
      usage >&2
      exit 2
      ;;
    *)
      usage >&2
      echo "hpcrun.sh: unknown command '$1'" >&2
      exit 2
      ;;
  esac
}

main "$@"
