#!/usr/bin/env bash
# A real Slurm on this machine, for tests and for trying the sbatch scripts: one node, or
# several nodes, each in its own network namespace.
#
#   bash scripts/slurm_local.sh start [--nodes N]  # install (root, Debian) if missing, start, wait idle
#   bash scripts/slurm_local.sh stop [--nodes N]   # stop the daemons (and remove the virtual nodes)
#   bash scripts/slurm_local.sh env [--nodes N]    # print the SLURM_CONF line clients need
#
# Installs Debian's slurm-wlm and munge when missing (apt-get, as root), writes a private
# slurm.conf under $SLURM_LOCAL_DIR (default /tmp/megatron_ecdit-slurm) with one node named
# after the host, and runs munged, slurmctld and slurmd in the background. Settings that work
# without systemd or cgroups: proctrack/linuxproc, task/none, no accounting. Idempotent: a
# running cluster is left as it is. Clients use it with SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf.
#
# --nodes N (2 to 4, as root): nodes ecn1..ecnN, each slurmd in its own network namespace
# (a veth on the bridge ecbr0 with 198.18.0.1i/24, from the range reserved for network tests;
# no route out, no NAT, no forwarding) and UTS namespace (its host name); slurmctld as ecctl,
# the bridge's 198.18.0.1. /etc/hosts gets a marked line per name; munge's socket is shared.
# Its folder is $SLURM_LOCAL_DIR-nodes. `stop --nodes N` kills the daemons and the jobs left
# in the nodes, and removes every namespace, link and /etc/hosts line it made.
set -euo pipefail
COMMAND="${1:-start}"
NODES=0
if [ "${2:-}" = --nodes ]; then NODES="${3:?--nodes needs a number}"; fi
case "$NODES" in 0|2|3|4) ;; *) echo "slurm_local.sh: --nodes must be 2, 3 or 4" >&2; exit 2 ;; esac
DIR="${SLURM_LOCAL_DIR:-/tmp/megatron_ecdit-slurm}"
if [ "$NODES" != 0 ]; then DIR="$DIR-nodes"; fi
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
BRIDGE=ecbr0
MARK="# megatron_ecdit virtual node"

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

conf_common() {  # the settings of both modes, after the names of hosts and files
  cat <<EOF
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
EOF
}

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
$(conf_common)
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start_munge() {
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null; chown munge:munge /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
}

start() {
  install_if_missing
  mkdir -p "$DIR"
  [ -f "$CONF" ] || write_conf
  start_munge
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

# ---------------------------------------------------------------- several nodes

write_nodes_conf() {
  local cpus mem port i
  cpus="$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')"
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
  port="${SLURM_LOCAL_PORT:-6827}"  # not the one-node cluster's: both may run at once
  mkdir -p "$DIR/state" "$DIR/log"
  for i in $(seq "$NODES"); do mkdir -p "$DIR/spool/ecn$i"; done
  {
    cat <<EOF
ClusterName=localnodes
SlurmctldHost=ecctl(198.18.0.1)
SlurmUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pidfile
SlurmdPidFile=$DIR/slurmd-%n.pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
EOF
    conf_common
    # The nodes share this machine's cores: each is declared with all of them.
    for i in $(seq "$NODES"); do
      echo "NodeName=ecn$i NodeAddr=198.18.0.1$i CPUs=$cpus RealMemory=$((mem / NODES)) State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=ecn[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } > "$CONF"
}

hosts_add() {
  grep -q "ecctl $MARK" /etc/hosts || echo "198.18.0.1 ecctl $MARK" >> /etc/hosts
  for i in $(seq "$NODES"); do
    grep -q "ecn$i $MARK" /etc/hosts || echo "198.18.0.1$i ecn$i $MARK" >> /etc/hosts
  done
}

hosts_remove() {  # rewritten in place: /etc/hosts may be a bind mount
  local kept
  kept="$(grep -v "$MARK" /etc/hosts || true)"
  printf '%s\n' "$kept" > /etc/hosts
}

net_up() {
  local i
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr show dev "$BRIDGE" | grep -q "198.18.0.1/24" || ip addr add 198.18.0.1/24 dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq "$NODES"); do
    [ -e "/var/run/netns/ecn$i" ] || ip netns add "ecn$i"
    if ! ip link show "ecv$i" >/dev/null 2>&1; then
      ip link add "ecv$i" type veth peer name eth0 netns "ecn$i"
      ip link set "ecv$i" master "$BRIDGE" up
      ip -n "ecn$i" addr add "198.18.0.1$i/24" dev eth0
      ip -n "ecn$i" link set eth0 up
      ip -n "ecn$i" link set lo up
    fi
  done
}

net_down() {
  local i
  for i in 1 2 3 4; do
    ip link del "ecv$i" 2>/dev/null || true
    if [ -e "/var/run/netns/ecn$i" ]; then ip netns del "ecn$i" 2>/dev/null || true; fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

start_nodes() {
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_local.sh: --nodes needs root (network namespaces)" >&2
    exit 1
  fi
  install_if_missing
  mkdir -p "$DIR"
  write_nodes_conf
  net_up
  hosts_add
  start_munge
  if ! running slurmctld; then
    unshare --uts sh -c "hostname ecctl; exec slurmctld -D -f '$CONF'" \
      >"$DIR/log/slurmctld.out" 2>&1 &
    echo $! > "$DIR/slurmctld.pid"
  fi
  local i
  for i in $(seq "$NODES"); do
    if ! running "slurmd-ecn$i"; then
      # nsenter, not `ip netns exec`, which remounts /sys (slurmd then finds no cgroup fs)
      nsenter --net="/var/run/netns/ecn$i" unshare --uts \
        sh -c "hostname ecn$i; exec slurmd -D -N ecn$i -f '$CONF'" \
        >"$DIR/log/slurmd-ecn$i.out" 2>&1 &
      echo $! > "$DIR/slurmd-ecn$i.pid"
    fi
  done
  for _ in $(seq 120); do
    idle="$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true)"
    if [ "$idle" = "$NODES" ]; then
      echo "local Slurm is up: $NODES nodes ecn[1-$NODES]; export SLURM_CONF=$CONF"
      return 0
    fi
    sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(down|drain)/ {print $1}' | while read -r n; do
      scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
    done
    sleep 0.5
  done
  echo "slurm_local.sh: the nodes did not become idle; logs in $DIR/log" >&2
  tail -n 20 "$DIR"/log/*.log >&2 || true
  exit 1
}

stop_nodes() {
  local pidfile i
  for pidfile in "$DIR"/slurmd-ecn*.pid "$DIR/slurmctld.pid"; do
    [ -f "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  # job steps left in a node's namespace would keep it: they end with it
  for i in 1 2 3 4; do
    if [ -e "/var/run/netns/ecn$i" ]; then
      ip netns pids "ecn$i" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    fi
  done
  net_down
  hosts_remove
  if [ -f /run/munge/munged.pid ]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true; fi
}

case "$COMMAND:$NODES" in
  start:0) start ;;
  stop:0) stop ;;
  start:*) start_nodes ;;
  stop:*) stop_nodes ;;
  env:*) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env [--nodes N]" >&2; exit 2 ;;
esac
