#!/usr/bin/env bash
# A real single-node Slurm on this machine, for tests and for trying the sbatch scripts.
#
#   bash scripts/slurm_local.sh start    # install (as root, Debian) if missing, start, wait idle
#   bash scripts/slurm_local.sh stop     # stop the daemons
#   bash scripts/slurm_local.sh env      # print the SLURM_CONF line clients need
#
# Installs Debian's slurm-wlm and munge when missing (apt-get, as root), writes a private
# slurm.conf under $SLURM_LOCAL_DIR (default /tmp/megatron_ecdit-slurm) with one node named
# after the host, and runs munged, slurmctld and slurmd in the background. Settings that work
# without systemd or cgroups: proctrack/linuxproc, task/none, no accounting. Idempotent: a
# running cluster is left as it is. Clients use it with SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf.
set -euo pipefail
DIR="${SLURM_LOCAL_DIR:-/tmp/megatron_ecdit-slurm}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_local.sh: Slurm is not installed and this is not root; install slurm-wlm and munge" >&2
    exit 1
  fi
  echo "installing Debian's slurm-wlm and munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

write_conf() {
  local node cpus mem
  node="$(hostname -s)"
  # What slurmd sees (nproc would follow OMP_NUM_THREADS, which tests set to 1).
  cpus="$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')"
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat > "$CONF" <<EOF
ClusterName=local
SlurmctldHost=$node
SlurmUser=root
SlurmctldPort=${SLURM_LOCAL_PORT:-6817}
SlurmdPort=$(( ${SLURM_LOCAL_PORT:-6817} + 1 ))
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pidfile
SlurmdPidFile=$DIR/slurmd.pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=30
InactiveLimit=0
SchedulerParameters=nohold_on_prolog_fail
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start() {
  install_if_missing
  mkdir -p "$DIR"
  [ -f "$CONF" ] || write_conf
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null; chown munge:munge /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  if ! running slurmctld; then
    slurmctld -D -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 &
    echo $! > "$DIR/slurmctld.pid"
  fi
  if ! running slurmd; then
    slurmd -D -f "$CONF" >"$DIR/log/slurmd.out" 2>&1 &
    echo $! > "$DIR/slurmd.pid"
  fi
  for _ in $(seq 120); do
    state="$(sinfo -h -o %t 2>/dev/null | head -n1 || true)"
    case "$state" in
      idle|mix|alloc) echo "local Slurm is up (node $(hostname -s): $state); export SLURM_CONF=$CONF"; return 0 ;;
      down*|drain*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  echo "slurm_local.sh: the node did not become idle; logs in $DIR/log" >&2
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  exit 1
}

stop() {
  for daemon in slurmd slurmctld; do
    if running "$daemon"; then kill "$(cat "$DIR/$daemon.pid")" 2>/dev/null || true; fi
    rm -f "$DIR/$daemon.pid"
  done
  if [ -f /run/munge/munged.pid ]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true; fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
