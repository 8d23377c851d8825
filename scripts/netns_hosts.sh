#!/usr/bin/env bash
# A multi-host test bed on one Linux machine: N "hosts", each a network namespace with its own address on a
# private bridge and (through `unshare --uts`) its own hostname, so that rendezvous, gloo/NCCL sockets and Slurm
# daemons talk over a real network between real hostnames instead of 127.0.0.1.
#
#   bash scripts/netns_hosts.sh up BED N           # hosts BED-h0 .. BED-h<N-1> at 10.231.0.1 .. 10.231.0.N
#   bash scripts/netns_hosts.sh run BED I CMD...   # run CMD on host I (its namespace, its hostname BED-hI)
#   bash scripts/netns_hosts.sh down BED           # kill every process in the bed's namespaces, delete them
#   bash scripts/netns_hosts.sh list               # beds that exist now
#
# Topology: a bridge in a namespace of its own (BED-br), one veth pair per host (host end in BED-hI, other end on
# the bridge). Nothing is attached to the machine's own network namespace, so traffic only ever goes between
# the bed's hosts; two beds are separate networks and may both use 10.231.0.0/24. Names resolve on every host
# through /etc/netns/BED-hI/hosts, which `run` mounts over /etc/hosts (for getaddrinfo and `getent hosts`).
# Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); `up` exits 3 with a reason when the kernel refuses namespaces.
set -euo pipefail

SUBNET=${NETNS_HOSTS_SUBNET:-10.231.0}

die() { echo "netns_hosts: $*" >&2; exit "${2:-1}"; }
host_ns() { echo "$1-h$2"; }
bed_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$1-(br|h[0-9]+)$" || true; }

cmd_up() {
    local bed=$1 n=$2
    [[ $bed =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "bed name: 1-8 lowercase letters/digits, starting with a letter (interface names are short), got '$bed'" 2
    [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 200 ]] || die "host count: 1..200, got '$n'" 2
    [[ -z $(bed_namespaces "$bed") ]] || die "bed $bed exists already (bash $0 down $bed)" 2
    ip netns add "$bed-br" 2>/dev/null || die "cannot create network namespaces here (needs root and CAP_SYS_ADMIN)" 3
    ip netns exec "$bed-br" ip link add br0 type bridge 2>/dev/null \
        || { ip netns del "$bed-br"; die "cannot create a bridge in a network namespace here" 3; }
    ip netns exec "$bed-br" ip link set br0 up
    local hosts_file i ns
    hosts_file=$(printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n'
                 for ((i = 0; i < n; i++)); do echo "$SUBNET.$((i + 1)) $(host_ns "$bed" "$i")"; done)
    for ((i = 0; i < n; i++)); do
        ns=$(host_ns "$bed" "$i")
        ip netns add "$ns"
        # veth names: at most 15 characters, unique on the machine while both ends are created in the root namespace.
        ip link add "$bed$i"e type veth peer name "$bed$i"b
        ip link set "$bed$i"e netns "$ns"
        ip link set "$bed$i"b netns "$bed-br"
        ip netns exec "$bed-br" ip link set "$bed$i"b master br0 up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip link set "$bed$i"e name eth0
        ip netns exec "$ns" ip addr add "$SUBNET.$((i + 1))/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
        mkdir -p "/etc/netns/$ns"
        echo "$hosts_file" >"/etc/netns/$ns/hosts"
    done
    echo "netns_hosts: bed $bed up: $(for ((i = 0; i < n; i++)); do printf '%s=%s ' "$(host_ns "$bed" "$i")" "$SUBNET.$((i + 1))"; done)" >&2
}

cmd_run() {
    local bed=$1 i=$2
    shift 2
    local ns
    ns=$(host_ns "$bed" "$i")
    ip netns list | awk '{print $1}' | grep -qx "$ns" || die "no host $ns (bash $0 up $bed N)" 2
    # The host's network namespace, plus a UTS namespace of its own (the command and everything it starts get the
    # host's name) and a mount namespace in which the host's hosts file is /etc/hosts. Not `ip netns exec`: it
    # also mounts a fresh /sys without the machine's cgroup tree, which slurmd needs as on any real host.
    exec nsenter --net="/run/netns/$ns" unshare --mount --uts -- sh -c \
        'hostname "$0" && mount --bind "/etc/netns/$0/hosts" /etc/hosts && exec "$@"' "$ns" "$@"
}

cmd_down() {
    local bed=$1 ns pids
    for ns in $(bed_namespaces "$bed"); do
        # Every process whose network namespace this is, whoever started it: by PID, then the namespace by name.
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
    done
    for ns in $(bed_namespaces "$bed"); do
        for _ in $(seq 50); do [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break; sleep 0.1; done
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
}

case "${1:-}" in
    up) [[ $# == 3 ]] || die "usage: $0 up BED N" 2; cmd_up "$2" "$3" ;;
    run) [[ $# -ge 4 ]] || die "usage: $0 run BED I CMD..." 2; shift; cmd_run "$@" ;;
    down) [[ $# == 2 ]] || die "usage: $0 down BED" 2; cmd_down "$2" ;;
    list) ip netns list 2>/dev/null | awk '{print $1}' | sed -nE 's/^([a-z][a-z0-9]*)-br$/\1/p' ;;
    *) die "usage: $0 up BED N | run BED I CMD... | down BED | list" 2 ;;
esac
