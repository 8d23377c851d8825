#!/usr/bin/env bash
# A one-node Slurm test cluster (Debian 12 packages: munge, slurmctld, slurmd, slurm-client; Slurm 22.05) on this
# machine, without systemd: daemons are started directly, their PIDs written under $STATE, and stopped by PID.
#
#   bash scripts/slurm_cluster.sh install  # apt-get install the packages if missing (scripts/test.sh does this first)
#   bash scripts/slurm_cluster.sh start    # idempotent: installs (apt) if needed, configures, starts, waits idle
#   bash scripts/slurm_cluster.sh status   # exit 0 when the controller answers and the node is usable
#   bash scripts/slurm_cluster.sh stop     # stops the daemons this script started (by PID)
#   bash scripts/slurm_cluster.sh munge    # installs (apt) if needed and starts munged only (scripts/slurm_hosts.sh)
#
# Partitions: `debug` (default, PriorityTier=1) and `urgent` (PriorityTier=10): a job submitted to `urgent`
# preempts (requeues) `debug` jobs, sending them their --signal first (preempt_send_user_signal).
# Needs root (writes /etc/slurm, /etc/munge, /var/spool/slurm*). Bring-up ~60 s from nothing, ~5 s with packages.
set -euo pipefail
# shellcheck source=scripts/slurm_conf.sh
source "$(dirname "$0")/slurm_conf.sh"

STATE=${SLURM_TEST_STATE:-/var/run/pretrain-slurm}   # PID files of the daemons we started
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
# Declared CPUs exceed the real cores on purpose (config_overrides): tiny CPU jobs oversubscribe, and a preempting
# job must find free "CPUs" only once the preempted job is gone, which REQUEUE guarantees regardless.
NODE_CPUS=${SLURM_TEST_CPUS:-4}

log() { echo "slurm_cluster: $*" >&2; }

alive() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing munge slurmctld slurmd slurm-client (apt)"
    # policy-rc.d exiting 101 keeps the packages' init scripts from starting daemons during installation.
    local created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
    [[ $created_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    return 0
}

write_config() {
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$STATE"
    local mem
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))   # MiB offered to jobs: half of RAM
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a one-node test cluster on 127.0.0.1.
ClusterName=pretrain-test
SlurmctldHost=${NODE}(127.0.0.1)
$(slurm_conf_common)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${NODE_CPUS} RealMemory=${mem} State=UNKNOWN
# GraceTime: a pre-empted job gets its signal, then this long to checkpoint before it is requeued by force.
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=NO GraceTime=120
PartitionName=urgent Nodes=${NODE} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=NO
EOF
}

start_munge() {
    if alive munged; then return; fi
    if pgrep -x munged >/dev/null; then log "using the munged already running"; return; fi  # not ours to stop
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$STATE/munged.pid"   # munged writes it once daemonized
}

node_ready() {
    local state
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1) || return 1
    [[ $state =~ ^(idle|mixed|allocated) ]]
}

cmd_start() {
    if alive slurmctld && alive slurmd && node_ready; then log "already running"; return 0; fi
    install_packages
    write_config
    mkdir -p "$STATE"
    start_munge
    alive slurmctld || { /usr/sbin/slurmctld -i; sleep 1; }   # -i: ignore state saved by an earlier cluster
    alive slurmd || /usr/sbin/slurmd
    for _ in $(seq 60); do
        if node_ready; then log "up: $(sinfo -h -o '%P %T %C' | tr '\n' ' ')"; return 0; fi
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    log "node did not become idle; see /var/log/slurm/slurmctld.log and slurmd.log"
    sinfo -R >&2 || true
    return 1
}

cmd_stop() {
    for daemon in slurmd slurmctld munged; do
        if alive "$daemon"; then
            kill "$(cat "$STATE/$daemon.pid")" 2>/dev/null || true
            for _ in $(seq 20); do alive "$daemon" || break; sleep 0.5; done
            alive "$daemon" && kill -9 "$(cat "$STATE/$daemon.pid")" 2>/dev/null
        fi
        rm -f "$STATE/$daemon.pid"
    done
    log "stopped"
}

cmd_status() {
    alive slurmctld && alive slurmd && node_ready && sinfo
}

case "${1:-}" in
    install) install_packages ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    munge) install_packages; mkdir -p "$STATE"; start_munge ;;
    *) echo "usage: $0 install|start|stop|status|munge" >&2; exit 2 ;;
esac
