"""Fault tolerance: stop signals and exit codes (signals), the hang watchdog (watchdog), the NaN / spike guard
(guards) and the faults tests inject on purpose (faults). The trainer uses them as ``ft.<name>``."""

from pretrain.fault_tolerance.faults import TEST_FAULTS_ENV, TestFaults, injected_faults
from pretrain.fault_tolerance.guards import NonFiniteStep, loss_zscore, push_loss
from pretrain.fault_tolerance.signals import HANG_EXIT_CODE, NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, StopSignal
from pretrain.fault_tolerance.watchdog import HANG_DIR, Watchdog, hang_file, startup_collective_timeout_s

__all__ = ["HANG_DIR", "HANG_EXIT_CODE", "NONFINITE_EXIT_CODE", "REQUEUE_EXIT_CODE", "TEST_FAULTS_ENV", "NonFiniteStep",
           "StopSignal", "TestFaults", "Watchdog", "hang_file", "injected_faults", "loss_zscore", "push_loss",
           "startup_collective_timeout_s"]
