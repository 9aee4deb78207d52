#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests and CI: munged, one slurmctld and
# two slurmd (n1, n2) with distinct ports, everything under one state directory.
#   bash scripts/slurm_cluster.sh start [STATE_DIR]   # prints "export SLURM_CONF=..." on success
#   bash scripts/slurm_cluster.sh stop  [STATE_DIR]   # stops the daemons by their process ids
# Needs root and Debian's slurm-wlm and munge (installed by .ci/run: apt-get install slurm-wlm munge).
set -euo pipefail

action="${1:?usage: slurm_cluster.sh start|stop [STATE_DIR]}"
state="$(realpath -m "${2:-${SAMI_SLURM_DIR:-/tmp/sami-slurm}}")"
conf="$state/slurm.conf"
nodes=(n1 n2)
cpus="$(nproc)"
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "error: $1 not found; install Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge)." >&2
    exit 2
  }
}

write_config() {
  mkdir -p "$state/state" "$state/log"
  cat > "$conf" <<CONF
ClusterName=sami-ci
SlurmctldHost=$(hostname)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool-%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
# A requeued job may start again after cred_expire + 1 s (120 s by default): 60 s keeps step
# credentials generous on a slow machine and the requeue test a minute shorter; a scheduling pass
# every 5 s (not 60 s) starts it as soon as it may start.
AuthInfo=cred_expire=60
SchedulerParameters=sched_interval=5,bf_interval=5
KillWait=10
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
CONF
  local port=16818
  for node in "${nodes[@]}"; do
    echo "NodeName=$node NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN" >> "$conf"
    port=$((port + 1))
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE" >> "$conf"
}

map_hosts() {
  for node in "${nodes[@]}"; do
    grep -qE "^127\.0\.0\.1\s.*\b$node\b" /etc/hosts || echo "127.0.0.1 $node" >> /etc/hosts
  done
}

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  munged --force --pid-file "$state/munged.pid"
}

wait_for_nodes() {
  local deadline=$((SECONDS + 60))
  while [ $SECONDS -lt $deadline ]; do
    if [ "$(SLURM_CONF="$conf" sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" = "${#nodes[@]}" ]; then
      return 0
    fi
    sleep 1
  done
  echo "error: the slurm nodes did not come up within 60 s; see $state/log/" >&2
  SLURM_CONF="$conf" sinfo -N >&2 || true
  exit 1
}

start() {
  need slurmctld; need slurmd; need munged
  if [ -f "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; then
    echo "export SLURM_CONF=$conf"; return 0
  fi
  write_config
  map_hosts
  start_munge
  SLURM_CONF="$conf" slurmctld -f "$conf" -i
  for node in "${nodes[@]}"; do
    mkdir -p "$state/spool-$node"
    SLURM_CONF="$conf" slurmd -f "$conf" -N "$node"
  done
  wait_for_nodes
  echo "export SLURM_CONF=$conf"
}

stop() {
  local pidfile
  for pidfile in "$state"/slurmd-*.pid "$state/slurmctld.pid" "$state/munged.pid"; do
    [ -f "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm_cluster.sh start|stop [STATE_DIR]" >&2; exit 2 ;;
esac
