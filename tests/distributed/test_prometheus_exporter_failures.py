"""Two gloo ranks start their Prometheus exporters; rank 1's port is taken. Rank 1 trains on without one and
rank 0's /metrics counts it (pretrain_prometheus_exporter_failures_total), the job-wide number of ranks unseen."""

from __future__ import annotations

import socket
import urllib.request

import torch.distributed as dist
from prometheus_client.parser import text_string_to_metric_families

from pretrain.config import load
from pretrain.metrics import names
from pretrain.parallel.env import free_port
from pretrain.metrics.prometheus import from_config
from pretrain.testing import run_distributed
from tests.conftest import TINY_CONFIG


def _start_exporter(base_port: int) -> float | None:
    """This rank's exporter_failures counter as scraped from its own /metrics; None if it has no exporter."""
    rank = dist.get_rank()
    cfg = load(TINY_CONFIG, ["--metrics.prometheus.enabled=true", f"--metrics.prometheus.port={base_port}"])
    with socket.socket() as taken:
        if rank == 1:  # someone else holds rank 1's port (base + LOCAL_RANK)
            taken.bind(("127.0.0.1", base_port + 1))
            taken.listen()
        dist.barrier()
        exporter = from_config(cfg, local_rank=rank, rank=rank, layout={}, config_yaml="", tokens_per_sample=128,
                               device_name=None)
    if exporter is None:
        return None
    try:
        host, port = exporter.address
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    finally:
        exporter.close()
    return next(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == names.PROM_EXPORTER_FAILURES)


def test_taken_port_counted_on_the_rank_that_serves():
    assert run_distributed(_start_exporter, world_size=2, args=(free_port(count=2),), timeout_s=300) == [1.0, None]
