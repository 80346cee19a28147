#!/usr/bin/env bash
# Usage: tests/sge/up.sh [--packages]
# Start a single-node Grid Engine (Debian's gridengine 8.1.9: sge_qmaster + sge_execd) for
# the integration tests, installing gridengine-master, -exec and -client with apt-get first
# if they are missing. Idempotent: when both daemons run and the queue is ready it does
# nothing. --packages only answers the packages' debconf questions and prints them, one a
# line, for a caller that installs them itself with --no-install-recommends (.ci/run: one
# apt-get for both schedulers, with a policy-rc.d that keeps apt from starting daemons). The cell is Debian's: SGE_ROOT=/var/lib/gridengine, SGE_CELL=default (the
# Debian client wrappers default to both). One queue, all.q on this host: 2 slots,
# notify 00:00:05, no parallel environments, no load thresholds. The files up.sh writes
# (apt log, qconf input) go to $HPCRUN_SGE_DIR (default /tmp/hpcrun-sge); the daemons log
# to /var/spool/gridengine/{qmaster,execd/*}/messages. Stop everything with
# tests/sge/down.sh. Needs root (Debian/Ubuntu).
set -euo pipefail

readonly STATE_DIR="${HPCRUN_SGE_DIR:-/tmp/hpcrun-sge}"
readonly WAIT_SECONDS=60
readonly QUEUE=all.q
readonly SLOTS=2
readonly NOTIFY=00:00:05            # seconds between -notify's SIGUSR2 and the SIGKILL
readonly SPOOL=/var/spool/gridengine
export SGE_ROOT="${SGE_ROOT:-/var/lib/gridengine}"
export SGE_CELL="${SGE_CELL:-default}"
NODE="$(hostname)"
readonly NODE
readonly QMASTER_PID="$SPOOL/qmaster/qmaster.pid"
readonly PACKAGES=(gridengine-master gridengine-exec gridengine-client mailutils)
# Jobs inherit sge_execd's environment: start the daemons with as little as an init system
# would give them, not with the caller's (a SLURM_JOB_ID or HPCRUN_* there would reach jobs).
readonly DAEMON_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  "SGE_ROOT=$SGE_ROOT" "SGE_CELL=$SGE_CELL" LANG=C.UTF-8)

die() {
  echo "up.sh: error: $*" >&2
  exit 1
}

alive() { # alive PIDFILE: the process named in PIDFILE is running
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

execd_alive() { # execd spools in a directory named as it resolves itself (here: localhost)
  local pidfile
  for pidfile in "$SPOOL"/execd/*/execd.pid; do
    alive "$pidfile" && return
  done
  return 1
}

show_logs() {
  tail -n 5 "$SPOOL/qmaster/messages" "$SPOOL"/execd/*/messages >&2 2>/dev/null || true
}

preseed() { # answer the packages' questions: configure a cell 'default' mastered here
  local package
  for package in gridengine-common gridengine-client gridengine-master gridengine-exec; do
    printf '%s shared/gridengineconfig boolean true\n' "$package"
    printf '%s shared/gridenginecell string default\n' "$package"
    printf '%s shared/gridenginemaster string %s\n' "$package" "$NODE"
  done | debconf-set-selections
}

install_packages() {
  if command -v qsub >/dev/null && [[ -x /usr/sbin/sge_qmaster && -x /usr/sbin/sge_execd ]]; then
    [[ -f "$SGE_ROOT/$SGE_CELL/common/bootstrap" ]] ||
      die "gridengine is installed but the cell '$SGE_ROOT/$SGE_CELL' was never set up" \
        "(purge gridengine-master and run up.sh again)"
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  preseed
  if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
    apt-get update -q >"$STATE_DIR/apt.log" 2>&1 || true
  fi
  # mailutils satisfies the packages' mail dependency without an MTA
  if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$STATE_DIR/apt.log" 2>&1; then
    apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 || true # stale package lists
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$STATE_DIR/apt.log" 2>&1 ||
      die "apt-get install ${PACKAGES[*]} failed, see '$STATE_DIR/apt.log'"
  fi
  [[ -f "$SGE_ROOT/$SGE_CELL/common/bootstrap" ]] ||
    die "gridengine-master did not set up the cell, see '$STATE_DIR/apt.log'"
  stop_package_daemons
}

stop_package_daemons() { # where no policy-rc.d forbids it, the packages start the daemons
  local pidfile pid tries # without host_aliases and with apt's environment: stop them
  for pidfile in "$QMASTER_PID" "$SPOOL"/execd/*/execd.pid; do
    alive "$pidfile" || continue
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for ((tries = 0; tries < 150; tries++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

write_host_aliases() {
  # When this host's name maps to 127.0.0.1 whose first name is localhost, qmaster refuses
  # every client ("client IP resolved to host name localhost"): make the two names one host.
  local aliases="$SGE_ROOT/$SGE_CELL/common/host_aliases"
  if [[ "$(cat "$aliases" 2>/dev/null)" != "$NODE localhost" ]]; then
    echo "$NODE localhost" >"$aliases"
    chown sgeadmin:sgeadmin "$aliases" 2>/dev/null || true
  fi
}

wait_until() { # wait_until WHAT COMMAND...: poll COMMAND for WAIT_SECONDS
  local what="$1" deadline=$((SECONDS + WAIT_SECONDS))
  shift
  until "$@"; do
    if ((SECONDS >= deadline)); then
      show_logs
      die "$what not within ${WAIT_SECONDS}s"
    fi
    sleep 0.2
  done
}

qmaster_answers() {
  qconf -sconf global >/dev/null 2>&1
}

start_qmaster() {
  if ! alive "$QMASTER_PID"; then
    "${DAEMON_ENV[@]}" setsid /usr/sbin/sge_qmaster </dev/null >>"$STATE_DIR/daemons.log" 2>&1 ||
      die "sge_qmaster did not start, see '$SPOOL/qmaster/messages'"
  fi
  wait_until "sge_qmaster answering qconf" qmaster_answers
}

start_execd() {
  execd_alive && return
  "${DAEMON_ENV[@]}" setsid /usr/sbin/sge_execd </dev/null >>"$STATE_DIR/daemons.log" 2>&1 ||
    die "sge_execd did not start, see '$STATE_DIR/daemons.log' and $SPOOL/execd/*/messages"
}

configure() {
  local dir="$STATE_DIR/qconf"
  mkdir -p "$dir"
  # Root's jobs (Debian refuses uid/gid < 1000); accounting flushed every second.
  qconf -sconf global | sed -e '/^#/d' -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' \
    -e 's/flush_time=[0-9:]*/flush_time=00:00:01/' >"$dir/global"
  qconf -Mconf "$dir/global" >/dev/null 2>&1 || die "qconf -Mconf global failed"
  # Jobs start within about a second of qsub and their end is seen at once.
  qconf -ssconf | sed -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec 1/' -e 's/^flush_finish_sec .*/flush_finish_sec 1/' \
    >"$dir/scheduler"
  qconf -Msconf "$dir/scheduler" >/dev/null 2>&1 || die "qconf -Msconf failed"
  qconf -sm 2>/dev/null | grep -qx root || qconf -am root >/dev/null 2>&1 ||
    die "qconf -am root failed"
  qconf -ss 2>/dev/null | grep -qx "$NODE" || qconf -as "$NODE" >/dev/null 2>&1 ||
    die "qconf -as $NODE failed"
  if ! qconf -sel 2>/dev/null | grep -qx "$NODE"; then
    cat >"$dir/$NODE" <<HOST
hostname              $NODE
load_scaling          NONE
complex_values        NONE
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
HOST
    qconf -Ae "$dir/$NODE" >/dev/null 2>&1 || die "qconf -Ae $NODE failed"
  fi
  write_queue "$dir/$QUEUE"
  if qconf -sql 2>/dev/null | grep -qx "$QUEUE"; then
    qconf -Mq "$dir/$QUEUE" >/dev/null 2>&1 || die "qconf -Mq $QUEUE failed"
  else
    qconf -Aq "$dir/$QUEUE" >/dev/null 2>&1 || die "qconf -Aq $QUEUE failed"
  fi
}

write_queue() { # the queue: Grid Engine's defaults except hostlist, slots, notify, pe_list, load_thresholds
  cat >"$1" <<QUEUE
qname                 $QUEUE
hostlist              $NODE
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               NONE
rerun                 FALSE
slots                 $SLOTS
tmpdir                /tmp
shell                 /bin/sh
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                $NOTIFY
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
QUEUE
}

queue_ready() { # qstat -f shows the queue instance with its arch and no state letters
  local line
  line="$(qstat -f -q "$QUEUE" 2>/dev/null | grep "^$QUEUE@$NODE " || true)"
  # queuename qtype resv/used/tot load_avg arch [states]
  [[ -n "$line" ]] && awk '{ exit !(NF == 5 && $5 != "-NA-") }' <<<"$line"
}

check_job_runs() { # a real job proves min_uid, the submit and execution host, the queue
  local out
  out="$(cd / && timeout "$WAIT_SECONDS" qsub -sync y -b y -shell no -N up.sh-check \
    -o /dev/null -e /dev/null /bin/true 2>&1)" ||
    die "a test job did not run: $out"
}

main() {
  [[ "$EUID" -eq 0 ]] || die "must run as root"
  if [[ "${1:-}" == "--packages" ]]; then
    preseed
    printf '%s\n' "${PACKAGES[@]}"
    return
  fi
  mkdir -p "$STATE_DIR"
  install_packages
  if alive "$QMASTER_PID" && execd_alive && queue_ready; then
    echo "sge: already up (node $NODE, queue $QUEUE, SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL)"
    return
  fi
  write_host_aliases
  start_qmaster
  configure
  start_execd
  wait_until "queue $QUEUE@$NODE ready in qstat -f" queue_ready
  check_job_runs
  alive "$QMASTER_PID" || die "sge_qmaster exited, see '$SPOOL/qmaster/messages'"
  execd_alive || die "sge_execd exited, see $SPOOL/execd/*/messages"
  echo "sge: up (node $NODE, queue $QUEUE, SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL)"
}

main "$@"
