# Sourced by scripts/slurm_cluster.sh (one node on 127.0.0.1) and scripts/slurm_hosts.sh (N network-namespace
# hosts): the slurm.conf settings both test clusters share. Each writer adds its names, addresses, paths and nodes.

slurm_conf_common() {
    cat <<'EOF_COMMON'
SlurmUser=root
AuthType=auth/munge
# Credentials expire after 10 s (default 120): otherwise a requeued job waits ~121 s before it may start again.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2,bf_interval=1
JobRequeue=1
ReturnToService=2
# Declared CPUs may exceed the real cores (the writers' CPUs=): tiny CPU jobs oversubscribe.
SlurmdParameters=config_overrides
MpiDefault=none
KillWait=10
MinJobAge=300
EOF_COMMON
}
