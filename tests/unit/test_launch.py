"""Launchers as pure functions: Slurm nodelists and SLURM_* → torch env, torchrun argv, sbatch rendering."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain.parallel import slurm_env
from launch.local import LocalLaunch, node_exit_code, torchrun_argv
from launch.slurm import SlurmJob, render, template_name
from pretrain.errors import ConfigError


@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),  # zero padding kept across a digit boundary
    ("a[1-2],b,c[9]", ["a1", "a2", "b", "c9"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("login-1.cluster,gpu[3]", ["login-1.cluster", "gpu3"]),
])
def test_expand_nodelist(text, hosts):
    assert slurm_env.expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["", "gpu[01-04", "gpu01-04]", "gpu[04-01]", "gpu[a-b]"])
def test_bad_nodelist_names_the_variable(text):
    with pytest.raises(slurm_env.NodelistError, match="SLURM_JOB_NODELIST"):
        slurm_env.expand_nodelist(text)


def srun_env(**extra) -> dict[str, str]:
    """The variables srun sets in task 5 of an 8-task step on gpu[01-02] (4 tasks per node)."""
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_JOB_NODELIST": "gpu[01-04,07]", "SLURM_STEP_NODELIST": "gpu[02,07]", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    env.update(extra)
    return env


def test_torch_env_from_srun_task():
    env = slurm_env.torch_env(srun_env(), use_scontrol=False)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu02", "MASTER_PORT": str(10000 + 123456 % 20000)}
    # Every task of the job agrees on the rendezvous, whatever its rank.
    other = slurm_env.torch_env(srun_env(SLURM_PROCID="0", SLURM_LOCALID="0"), use_scontrol=False)
    assert (other["MASTER_ADDR"], other["MASTER_PORT"]) == (env["MASTER_ADDR"], env["MASTER_PORT"])


def test_torch_env_job_nodelist_fallback_and_user_pins():
    env = srun_env(MASTER_PORT="29555")
    del env["SLURM_STEP_NODELIST"]
    mapped = slurm_env.torch_env(env, use_scontrol=False)
    assert mapped["MASTER_ADDR"] == "gpu01" and mapped["MASTER_PORT"] == "29555"


def test_master_port_stable_and_in_range():
    assert slurm_env.master_port("77") == slurm_env.master_port(77) == 10077
    assert all(10000 <= slurm_env.master_port(j) < 30000 for j in (0, 19999, 20000, 987654321))
    with pytest.raises(slurm_env.NodelistError, match="SLURM_JOB_ID"):
        slurm_env.master_port("abc")


def test_apply_only_in_a_bare_srun_task():
    batch_shell = {k: v for k, v in srun_env(SLURM_PROCID="0").items() if not k.startswith("SLURM_STEP")}
    assert not slurm_env.apply(batch_shell) and "RANK" not in batch_shell  # sbatch's shell: not a step
    under_torchrun = srun_env(RANK="3", WORLD_SIZE="4")
    assert not slurm_env.apply(under_torchrun) and under_torchrun["RANK"] == "3"  # srun torchrun: torchrun's env
    task = srun_env()
    assert slurm_env.apply(task) and task["RANK"] == "5" and task["WORLD_SIZE"] == "8"


def test_first_host_uses_scontrol_when_present_else_parses():
    assert slurm_env.first_host("gpu[07,01]", use_scontrol=False) == "gpu07"
    # scontrol either answers (cluster up) or fails; both give the same first host.
    assert slurm_env.first_host("gpu[07,01]") == "gpu07"


def test_torchrun_argv_single_and_multi_node():
    single = torchrun_argv(LocalLaunch(nproc=2), ["train", "c.yaml", "--train.steps=5"])
    assert single[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=0",
                          "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", "--standalone",
                          "-m", "pretrain", "train", "c.yaml", "--train.steps=5"]
    multi = torchrun_argv(LocalLaunch(nproc=4, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400",
                                      max_restarts=3), ["train", "c.yaml"])
    assert "--standalone" not in multi
    for arg in ("--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400",
                "--max-restarts=3", "--nproc-per-node=4"):
        assert arg in multi


@pytest.mark.parametrize("kwargs, key", [
    ({"nproc": 0}, "--nproc"),
    ({"nproc": 2, "nnodes": 2}, "--rdzv-endpoint"),
    ({"nproc": 2, "nnodes": 2, "rdzv_endpoint": "host"}, "--rdzv-endpoint"),
    ({"nproc": 2, "nnodes": 2, "rdzv_endpoint": "h:1", "node_rank": 2}, "--node-rank"),
    ({"nproc": 2, "max_restarts": -1}, "--max-restarts"),
])
def test_bad_local_launch(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LocalLaunch(**kwargs)


def test_render_templates():
    args = ["configs/debug/gpt_tiny.yaml", "--train.steps=5", "--run.dir=/tmp/a b"]
    single = render(SlurmJob(gpus_per_node=8, partition="gpu", time="04:00:00"), args, python="python3")
    assert "#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-node=8\n#SBATCH --cpus-per-task=1" in single
    assert "#SBATCH --partition=gpu" in single and "#SBATCH --time=04:00:00" in single
    # srun is given the CPUs per task again: from Slurm 22.11 it does not inherit them from sbatch.
    assert 'srun --cpus-per-task="${SLURM_CPUS_PER_TASK}" python3 -m pretrain train configs/debug/gpt_tiny.yaml ' \
           "--train.steps=5 '--run.dir=/tmp/a b'" in single
    assert "export OMP_NUM_THREADS=" in single and "NCCL_DEBUG" in single
    multi = render(SlurmJob(nodes=4, gpus_per_node=8, cpus_per_task=6), args)
    assert template_name(SlurmJob(nodes=4)) == "multi_node.sbatch"
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1" in multi and "--cpus-per-task=48" in multi
    assert "-m pretrain launch local \\\n    --nproc=8 --nnodes=\"${SLURM_JOB_NUM_NODES}\"" in multi
    assert 'getent hosts "${MASTER_ADDR}"' in multi  # the rendezvous host must resolve before anything starts
    assert "#SBATCH --signal=B:USR1@120" in multi and "trap 'forward USR1' USR1" in multi
    assert "REQUEUE=0" in multi and "#SBATCH --requeue" not in multi
    multi_requeue = render(SlurmJob(nodes=2, gpus_per_node=0, procs_per_node=2, requeue=True), args)
    assert template_name(SlurmJob(nodes=2, requeue=True)) == "multi_node.sbatch"
    assert "REQUEUE=1" in multi_requeue and "#SBATCH --requeue\n#SBATCH --open-mode=append" in multi_requeue
    assert 'ExcNodeList="${hung}"' in multi_requeue
    cpu = render(SlurmJob(gpus_per_node=0, procs_per_node=2, requeue=True, signal_seconds=90), args)
    assert "--gpus-per-node" not in cpu and "#SBATCH --ntasks-per-node=2" in cpu
    assert "#SBATCH --requeue" in cpu and "#SBATCH --signal=B:USR1@90" in cpu
    assert 'scontrol requeue "${SLURM_JOB_ID}"' in cpu and "SLURM_RESTART_COUNT" in cpu
    for script in (single, multi, multi_requeue, cpu):  # valid bash
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("kwargs, key", [
    ({"gpus_per_node": 0}, "--procs-per-node"),
    ({"nodes": 0}, "--nodes"),
    ({"time": "4 hours"}, "--time"),
])
def test_bad_slurm_job(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SlurmJob(**kwargs)


def test_cli_dry_run_prints_script_and_bad_input_is_one_line():
    cmd = [sys.executable, "-m", "pretrain", "launch", "slurm", "--gpus-per-node", "0", "--procs-per-node", "2",
           "--requeue", "configs/debug/gpt_tiny.yaml", "--train.steps=7", "--dry-run"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("#!/bin/bash") and "--train.steps=7" in out.stdout
    bad = subprocess.run(cmd[:7] + ["configs/debug/gpt_tiny.yaml", "--dry-run"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: --procs-per-node: required (>= 1) with --gpus-per-node 0 (CPU processes per node)"


def test_malformed_nodelist_fails_in_one_line_before_any_rendezvous():
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "gpu[01-", "SLURM_JOB_ID": "5"}
    with pytest.raises(ConfigError, match=r"SLURM_JOB_NODELIST: unbalanced '\[' in 'gpu\[01-'"):
        slurm_env.apply(dict(env))  # with scontrol on PATH too (it would answer a bogus host, "gpu]")


@pytest.mark.parametrize("codes, nproc, expected", [
    ([], 2, 0),  # no failures: every worker finished
    ([75, 75], 2, 75),  # every worker checkpointed on a signal: requeue
    ([75], 2, 1),  # one saved, one finished: not a requeue request
    ([86, -15], 2, 86),  # a hang, its peer then stopped by the agent
    ([-15, 86], 2, 86),  # a hang wins even when it is not the first failure
    ([75, -9], 2, 137),  # a worker killed before it could save: its signal, as a shell reports it
    ([2, 2], 2, 2),  # a bad config on every rank
    ([87, 87, 87, 87], 4, 87),  # non-finite loss under ft.nan_policy=abort
    ([1, -15], 2, 1),  # the root cause (a crash), not the agent's SIGTERM to its peer
])
def test_node_exit_code_from_worker_codes(codes, nproc, expected):
    assert node_exit_code(codes, nproc) == expected


@pytest.mark.parametrize("kwargs, flag", [
    ({"job_name": "train\nscancel -u $USER"}, "--job-name"),
    ({"partition": "gpu\n#SBATCH --account=other"}, "--partition"),
    ({"time": "04:00:00\n"}, "--time"),
    ({"output": "runs/%j.log\r"}, "--output"),
    ({"workdir": "/work/a\nb"}, "--workdir"),
    ({"extra": ("--qos=high", "--account=abc\nrm -rf ~")}, "--sbatch-option"),
    ({"job_name": "tab\there"}, "--job-name"),
    ({"job_name": "esc\x1b[2J"}, "--job-name"),
    ({"job_name": "line\u2028separator"}, "--job-name"),
])
def test_control_characters_refused_naming_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as info:
        SlurmJob(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{flag}: control character ") and "\n" not in message, message


def test_sbatch_option_must_be_an_option():
    with pytest.raises(ConfigError, match=r"^--sbatch-option: expected an sbatch option such as --account=abc, "
                                          r"got 'account=abc'$"):
        SlurmJob(extra=("account=abc",))


@pytest.mark.parametrize("train_args, flag", [
    (["configs/x.yaml\necho owned"], "config"),
    (["c.yaml", "--run.name=a\nb"], "--run.name"),
])
def test_control_characters_in_train_args_refused(train_args, flag):
    with pytest.raises(ConfigError, match=f"^{flag}: control character '\\\\n' at position"):
        render(SlurmJob(), train_args)


def test_cli_control_character_is_one_line_error():
    cmd = [sys.executable, "-m", "pretrain", "launch", "slurm", "--gpus-per-node", "0", "--procs-per-node", "2",
           "--job-name", "x\n#SBATCH --account=other", "configs/debug/gpt_tiny.yaml", "--dry-run"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr.strip() == ("error: --job-name: control character '\\n' at position 1 in "
                                  "'x\\n#SBATCH --account=other' (values are written into the sbatch script, where "
                                  "it would break or add lines)")


@pytest.mark.parametrize("endpoint", ["localhost:29400", "127.0.0.1:29400", "[::1]:29400"])
def test_a_loopback_rendezvous_is_refused_for_several_nodes(endpoint):
    with pytest.raises(ConfigError, match=r"^--rdzv-endpoint: host '.*' resolves to loopback .* with 2 nodes: each "
                                          r"node would rendezvous with itself and train alone"):
        LocalLaunch(nproc=1, nnodes=2, rdzv_endpoint=endpoint)
    LocalLaunch(nproc=1, nnodes=1, rdzv_endpoint=endpoint)  # one node: loopback is the right address


def test_a_rendezvous_host_that_does_not_resolve_is_refused():
    with pytest.raises(ConfigError, match=r"^--rdzv-endpoint: host 'no-such-host\.invalid' does not resolve"):
        LocalLaunch(nproc=1, nnodes=2, rdzv_endpoint="no-such-host.invalid:29400")


def test_bus_bandwidth_is_nccl_tests_busbw():
    from pretrain.parallel.preflight import bus_bandwidth

    # 1 GB in 1 s over 4 ranks: a ring moves 2 (n - 1) / n of it per rank.
    assert bus_bandwidth(10**9, 4, 1.0) == 1.5
    assert bus_bandwidth(10**9, 2, 0.5) == 2.0


def test_slurm_prepare_renders_an_array_and_an_afterok_merge():
    from launch.slurm_prepare import PrepareJob, render

    job = PrepareJob(tasks=4, max_parallel=2, prepare_args=("--input", "a b.jsonl", "--tokenizer", "t.model",
                                                              "--output", "out", "--seq-length", "128"),
                     output="out", cpus_per_task=3, log_dir="logs")
    array, merge = render(job, "4711")
    assert "#SBATCH --array=0-3%2" in array and "#SBATCH --requeue" in array and "#SBATCH --cpus-per-task=3" in array
    assert ("data prepare --input 'a b.jsonl' --tokenizer t.model --output out --seq-length 128 --workers 3 "
            '--num-tasks 4 --task-index "${SLURM_ARRAY_TASK_ID}"') in array
    assert "#SBATCH --dependency=afterok:4711" in merge and merge.rstrip().endswith("-m pretrain data merge out")
    assert "#SBATCH --output=logs/%x-%A_%a.log" in array
    with pytest.raises(ConfigError, match="--tasks"):
        PrepareJob(tasks=0, output="out")
    with pytest.raises(ConfigError, match="control character"):
        PrepareJob(tasks=2, output="out\n#SBATCH --x")
