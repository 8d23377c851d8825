"""Multi-node tests: every test here runs on network-namespace hosts (tests/multinode/hosts.py) and is skipped,
with the reason, only where the kernel refuses namespaces."""

from __future__ import annotations

import functools

import pytest

from tests.multinode.hosts import namespaces_refused

_refused = functools.cache(namespaces_refused)


@pytest.fixture(autouse=True)
def _needs_namespaces():
    if (reason := _refused()) is not None:
        pytest.skip(reason)
