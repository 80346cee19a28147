#!/usr/bin/env bash
# Usage: tests/slurm/up.sh [--packages]
# Start a single-node Slurm (slurmctld + slurmd + munged) for the integration tests,
# installing slurm-wlm and munge with apt-get first if they are missing. Idempotent.
# --packages only prints the packages it would install, one a line, for a caller that
# installs them itself (.ci/run: one apt-get for both schedulers).
# Config, state, logs and pid files live in $HPCRUN_SLURM_DIR (default /tmp/hpcrun-slurm);
# point the Slurm commands at it with  export SLURM_CONF="$HPCRUN_SLURM_DIR/slurm.conf".
# Stop everything with tests/slurm/down.sh. Needs root (Debian/Ubuntu).
set -euo pipefail

readonly STATE_DIR="${HPCRUN_SLURM_DIR:-/tmp/hpcrun-slurm}"
readonly WAIT_SECONDS=60
readonly PACKAGES=(slurm-wlm munge)
readonly CPUS=16  # job slots of the test node, whatever the machine has (see write_config)
NODE="$(hostname -s)"
readonly NODE
export SLURM_CONF="$STATE_DIR/slurm.conf"

die() {
  echo "up.sh: error: $*" >&2
  exit 1
}

alive() { # alive PIDFILE: the process named in PIDFILE is running
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
    apt-get update -q >"$STATE_DIR/apt.log" 2>&1 || true
  fi
  apt-get install -y -q "${PACKAGES[@]}" >>"$STATE_DIR/apt.log" 2>&1 ||
    die "apt-get install ${PACKAGES[*]} failed, see '$STATE_DIR/apt.log'"
}

start_munge() {
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0600 /etc/munge/munge.key
  fi
  munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return # a munged already answers
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- munged || die "munged did not start, see /var/log/munge/munged.log"
  cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
}

write_config() {
  cat >"$STATE_DIR/slurm.conf" <<CONF
# written by tests/slurm/up.sh
ClusterName=hpcrun-test
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
KillWait=5
MinJobAge=300
SlurmdTimeout=60
InactiveLimit=0
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# More CPUs than the machine has (config_overrides): every test job runs at once, none waits
# in the queue behind the 1-minute time-limit jobs. The test trainings mostly sleep.
SlurmdParameters=config_overrides
NodeName=$NODE CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
  cat >"$STATE_DIR/cgroup.conf" <<CONF
# written by tests/slurm/up.sh
CgroupPlugin=cgroup/v1
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
CONF
}

start_slurm() {
  mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool"
  alive "$STATE_DIR/slurmctld.pid" || slurmctld || die "slurmctld did not start, see '$STATE_DIR/slurmctld.log'"
  alive "$STATE_DIR/slurmd.pid" || slurmd || die "slurmd did not start, see '$STATE_DIR/slurmd.log'"
}

wait_for_node() {
  local deadline=$((SECONDS + WAIT_SECONDS)) state
  while ((SECONDS < deadline)); do
    state="$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)"
    case "$state" in idle | mix | alloc) return ;; esac
    sleep 0.5
  done
  tail -n 5 "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd.log" >&2 || true
  die "node '$NODE' not idle after ${WAIT_SECONDS}s (state: '${state:-none}')"
}

check_job_runs() { # a real job step proves munge, slurmd and the cgroup plugins
  timeout "$WAIT_SECONDS" srun --quiet --time=1 --job-name=up.sh-check true ||
    die "a test job did not run, see '$STATE_DIR/slurmd.log'"
}

main() {
  if [[ "${1:-}" == "--packages" ]]; then
    printf '%s\n' "${PACKAGES[@]}"
    return
  fi
  [[ "$EUID" -eq 0 ]] || die "must run as root"
  mkdir -p "$STATE_DIR"
  install_packages
  start_munge
  if alive "$STATE_DIR/slurmctld.pid" && alive "$STATE_DIR/slurmd.pid"; then
    echo "slurm: already up (node $NODE, SLURM_CONF=$SLURM_CONF)"
    return
  fi
  write_config
  start_slurm
  wait_for_node
  check_job_runs
  for daemon in slurmctld slurmd; do # a daemon that lost its port to another Slurm dies
    alive "$STATE_DIR/$daemon.pid" || die "$daemon exited, see '$STATE_DIR/$daemon.log'"
  done
  echo "slurm: up (node $NODE, SLURM_CONF=$SLURM_CONF)"
}

main "$@"
