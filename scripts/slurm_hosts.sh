#!/usr/bin/env bash
# A multi-node Slurm test cluster on network-namespace hosts (scripts/netns_hosts.sh): slurmctld on host 0, one
# slurmd per host, each under its own hostname and address, so `srun` really spans nodes and jobs rendezvous over
# a network. Debian 12's Slurm 22.05 packages; munge as in scripts/slurm_cluster.sh (one key, one munged: its
# socket is a file, reachable from every namespace). Independent of the one-node test cluster: own config file,
# own state directories, its own network.
#
#   bash scripts/slurm_hosts.sh up BED N [DIR]     # hosts BED-h0..h<N-1>, config and state under DIR
#   bash scripts/slurm_hosts.sh run BED I CMD...   # CMD on host I with SLURM_CONF set (sbatch, squeue, scontrol)
#   bash scripts/slurm_hosts.sh slurmd BED I       # (re)start host I's slurmd, e.g. after killing the host
#   bash scripts/slurm_hosts.sh down BED           # stop the daemons and delete the hosts
#
# DIR defaults to /tmp/slurm-hosts-BED and holds slurm.conf and the daemons' spool, state, logs and PID files.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
NETNS=$HERE/netns_hosts.sh
# shellcheck source=scripts/slurm_conf.sh
source "$HERE/slurm_conf.sh"
CPUS=${SLURM_HOSTS_CPUS:-2}   # declared per node (config_overrides): more than the real cores, on purpose

die() { echo "slurm_hosts: $*" >&2; exit "${2:-1}"; }
dir_of() { cat "/tmp/slurm-hosts-$1.dir" 2>/dev/null || echo "/tmp/slurm-hosts-$1"; }

write_config() {
    local bed=$1 n=$2 dir=$3 i names mem
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 / n ))
    names=$(for ((i = 0; i < n; i++)); do printf '%s,' "$bed-h$i"; done)
    cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm_hosts.sh: $n nodes on network-namespace hosts of bed $bed.
ClusterName=$bed
SlurmctldHost=$bed-h0(10.231.0.1)
$(slurm_conf_common)
# A node whose slurmd stops answering is DOWN after 10 s (default 300), and its jobs requeue.
SlurmdTimeout=10
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/slurmd.%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
EOF
    for ((i = 0; i < n; i++)); do
        echo "NodeName=$bed-h$i NodeAddr=10.231.0.$((i + 1)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN" >>"$dir/slurm.conf"
    done
    echo "PartitionName=hosts Nodes=${names%,} Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
}

start_slurmd() {
    local bed=$1 i=$2 dir
    dir=$(dir_of "$bed")
    mkdir -p "$dir/slurmd.$bed-h$i"
    SLURM_CONF=$dir/slurm.conf bash "$NETNS" run "$bed" "$i" /usr/sbin/slurmd -f "$dir/slurm.conf" -N "$bed-h$i"
}

cmd_up() {
    local bed=$1 n=$2 dir=${3:-/tmp/slurm-hosts-$1} i
    rm -rf "$dir" && mkdir -p "$dir/ctld"
    echo "$dir" >"/tmp/slurm-hosts-$bed.dir"
    write_config "$bed" "$n" "$dir"
    bash "$HERE/slurm_cluster.sh" munge   # the machine's munged (started if none runs), shared with that cluster
    bash "$NETNS" up "$bed" "$n"
    SLURM_CONF=$dir/slurm.conf bash "$NETNS" run "$bed" 0 /usr/sbin/slurmctld -i -f "$dir/slurm.conf"
    for ((i = 0; i < n; i++)); do start_slurmd "$bed" "$i"; done
    for _ in $(seq 60); do
        if [[ $(cmd_run "$bed" 0 sinfo -h -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)') -ge 1 ]] \
            && [[ -z $(cmd_run "$bed" 0 sinfo -h -N -o '%N %T' 2>/dev/null | grep -vE ' (idle|mixed|allocated)$') ]]; then
            echo "slurm_hosts: up: $(cmd_run "$bed" 0 sinfo -h -N -o '%N=%T' | tr '\n' ' ')" >&2
            return 0
        fi
        cmd_run "$bed" 0 scontrol update nodename="$bed-h[0-$((n - 1))]" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    die "nodes did not become idle; see $dir/*.log: $(cmd_run "$bed" 0 sinfo -h -N -o '%N=%T' 2>&1 | tr '\n' ' ')"
}

cmd_run() {
    local bed=$1 i=$2 dir
    shift 2
    dir=$(dir_of "$bed")
    SLURM_CONF=$dir/slurm.conf bash "$NETNS" run "$bed" "$i" "$@"
}

cmd_down() {
    local bed=$1
    bash "$NETNS" down "$bed"   # every daemon and job process lives in the bed's namespaces
    rm -f "/tmp/slurm-hosts-$bed.dir"
}

case "${1:-}" in
    up) [[ $# -ge 3 ]] || die "usage: $0 up BED N [DIR]" 2; cmd_up "$2" "$3" "${4:-}" ;;
    run) [[ $# -ge 4 ]] || die "usage: $0 run BED I CMD..." 2; shift; cmd_run "$@" ;;
    slurmd) [[ $# == 3 ]] || die "usage: $0 slurmd BED I" 2; start_slurmd "$2" "$3" ;;
    down) [[ $# == 2 ]] || die "usage: $0 down BED" 2; cmd_down "$2" ;;
    *) die "usage: $0 up BED N [DIR] | run BED I CMD... | slurmd BED I | down BED" 2 ;;
esac
