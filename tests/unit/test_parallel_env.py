"""pretrain/parallel/env.py: the one process-group bring-up and free ports."""

from __future__ import annotations

import socket
import subprocess
import sys

from pretrain.parallel.env import free_port
from tests.conftest import REPO, cli_env

# A group of one in a fresh process: the environment must stay as it was, so that processes started afterwards
# (the CLI runs of a test session) never inherit a stale RANK / MASTER_PORT and collide on it.
SCRIPT = r"""
import os, sys
import torch.distributed as dist
from pretrain import device
from pretrain.parallel import env

before = dict(os.environ)
device.apply_cpu_shims()
env.init_distributed("gloo", single_process=sys.argv[1] == "1")
assert dist.get_world_size() == 1 and dist.get_rank() == 0 and os.environ["LOCAL_RANK"] in ("0", before.get("LOCAL_RANK"))
launcher = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # LOCAL_RANK: DeepSpeed reads it
leaked = [k for k in launcher if before.get(k) != os.environ.get(k)]
env.shutdown()
print(leaked)
"""


def test_a_group_of_one_leaves_the_environment_alone():
    launcher_env = {**cli_env(), "RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "1"}
    for single, environ in (("0", cli_env()), ("1", launcher_env)):  # no launcher; inside one, told to go alone
        result = subprocess.run([sys.executable, "-c", SCRIPT, single], capture_output=True, text=True, cwd=REPO,
                                env=environ, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1] == "[]"


def test_free_port_gives_consecutive_free_ports_outside_the_ephemeral_range():
    base = free_port(count=3)
    # Outgoing connections (gloo opens hundreds) take their local ports from the ephemeral range; a port chosen
    # there can be gone before its user binds it.
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    assert base + 3 <= low or base > high
    for port in range(base, base + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # raises if taken
