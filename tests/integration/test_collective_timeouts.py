"""Every process group a training run creates (the default one, megatron-core's, DeepSpeed's) times out after our
watchdog would have fired, never before: NCCL's 10-minute default would otherwise kill a rank (SIGABRT, no stacks,
no exit 86) long before ft.step_timeout_s (30 min by default) or the startup bound ran out."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides

# One process of `pretrain train`'s own bring-up: main()'s init_distributed, then build() (groups, engine).
SCRIPT = r"""
import json, sys
from pretrain import config, device, train
from pretrain.parallel import env
from pretrain.parallel.dims import ParallelDims
from torch.distributed import distributed_c10d as c10d

cfg = config.load(sys.argv[1], sys.argv[2:])
info = device.detect(0, cfg.train.precision)
device.apply_cpu_shims()
env.init_distributed(info.backend, train._startup_timeout_s(cfg))
trainer = train.build(cfg, ParallelDims.from_config(cfg, 1), info)
timeouts = [env._group_timeout(group).total_seconds() for group in c10d._world.pg_map]
trainer.watchdog.close()
print(json.dumps({"timeouts": timeouts, "expected": train._startup_timeout_s(cfg),
                  "after_first_step": trainer.watchdog.collective_timeout_s()}))
env.shutdown()
"""


def test_every_group_outlasts_the_watchdog(shakespeare, tmp_path):
    args = ["--ft.step_timeout_s=40", "--ft.startup_timeout_s=100", "--ft.save_timeout_s=70",
            *data_overrides(shakespeare, tmp_path)]
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(TINY_CONFIG), *args], capture_output=True,
                            text=True, timeout=300, cwd=REPO, env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    # The longest phase bound (startup, 100 s) plus the watchdog's report margin (linger 10 s + backstop 10 s).
    assert found["expected"] == 120.0
    assert len(found["timeouts"]) >= 3  # default + megatron-core's groups (+ DeepSpeed's)
    assert set(found["timeouts"]) == {120.0}, found
    # After the first step the groups come down to the step/save bound plus the margin, still above both.
    assert found["after_first_step"] == 90.0
