"""The preflight on a real gloo group: every rank agrees, or every rank refuses with the same one line naming the
first rank and field that differ; missing nodes are named; the all-reduce is timed."""

from __future__ import annotations

import os

import torch

from pretrain.parallel import preflight
from pretrain.testing import run_distributed

CONFIG = "run:\n  name: a\n"
MANIFEST = {"vocab_size": 1024, "shards": ["a.tar"]}


def _outcomes() -> list[str]:
    """Runs the preflight once per case, all in one group; each case differs on the last rank only."""
    last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    real_code_version = preflight.code_version
    cases = {
        "agree": (CONFIG, MANIFEST, {}),
        "config": (CONFIG + ("  seed: 2\n" if last else ""), MANIFEST, {}),
        "data": (CONFIG, {**MANIFEST, "shards": ["b.tar"]} if last else MANIFEST, {}),
        "world": (CONFIG, MANIFEST, {"WORLD_SIZE": "8"} if last else {}),
        "code": (CONFIG, MANIFEST, {"code": "0.1.0+000000000000"} if last else {}),
        "nodes": (CONFIG, MANIFEST, {preflight.NNODES_ENV: "2"}),
    }
    found = []
    for name, (config_yaml, manifest, env) in cases.items():
        saved = dict(os.environ)
        os.environ.update({k: v for k, v in env.items() if k != "code"})
        if "code" in env:
            preflight.code_version = lambda: env["code"]
        try:
            report = preflight.run(config_yaml, manifest, 1.0, torch.device("cpu"))
            found.append(f"{name}: ok {report.world_size} {report.hosts} {report.bus_bandwidth_gbps is not None}")
        except preflight.PreflightError as e:
            found.append(f"{name}: {e}")
        finally:
            os.environ.clear()
            os.environ.update(saved)
            preflight.code_version = real_code_version
    return found


def test_preflight_agrees_or_names_the_first_disagreeing_rank_and_field():
    import socket

    per_rank = run_distributed(_outcomes, world_size=3)
    assert per_rank[0] == per_rank[1] == per_rank[2]  # every rank reaches the same verdict: no rank hangs
    outcome = dict(line.split(": ", 1) for line in per_rank[0])
    assert outcome["agree"] == f"ok 3 ('{socket.gethostname()}',) True"
    for case, field in (("config", "config_sha256"), ("data", "data_manifest_sha256"), ("world", "world_size"),
                        ("code", "code_version")):
        assert outcome[case].startswith(f"preflight: rank 2 (host {socket.gethostname()}) disagrees with rank 0 "
                                        f"on {field}: "), outcome[case]
        assert "\n" not in outcome[case]
    assert outcome["world"].split(f"on world_size: ")[1].startswith("8 vs 3;")
    assert outcome["nodes"].startswith(f"preflight: 1 of 2 nodes joined ({socket.gethostname()})")
