"""Metric names, in one place. The JSONL keys below are a contract (README, run directory, dashboards)."""

STEP = "step"
LOSS = "loss"
LR = "lr"
GRAD_NORM = "grad_norm"
TOKENS_PER_S = "tokens_per_s"
STEP_TIME_S = "step_time_s"
TOKENS_TOTAL = "tokens_total"
VAL_LOSS = "val_loss"
VAL_PPL = "val_ppl"
TFLOPS = "tflops_per_device"
DATA_FRACTIONS = "data_fractions"  # achieved share of samples per blended source, in data.train order
CHECKPOINT_BLOCKING_S = "checkpoint_blocking_s"  # seconds this step's save held the training loop
SKIPPED_SHARDS = "skipped_shards"  # corrupt/missing shards skipped under data.on_bad_shard=skip
SKIPPED_STEPS = "skipped_steps"  # total steps without an update (non-finite loss/grad norm, or a skipped spike)
LOSS_SPIKES = "loss_spikes"  # total steps whose loss was a spike (ft.spike_zscore), skipped or not
DATA_READ_BYTES = "data_read_bytes"  # bytes all ranks' training data readers read from shard files so far
GOODPUT_S = "goodput_s"  # rank 0: the run's seconds per kind over all attempts (pretrain.metrics.goodput.KINDS)
GOODPUT_UNCOMMITTED_S = "goodput_uncommitted_s"  # rank 0: seconds of steps no committed checkpoint holds yet

#: Keys every logged training step carries.
REQUIRED = (STEP, LOSS, LR, GRAD_NORM, TOKENS_PER_S, STEP_TIME_S)

# Step-time split and checkpoint commits, measured by the loop on log steps (every rank; JSONL on rank 0).
DATA_WAIT_S = "data_wait_s"  # seconds this step waited for its batches (reader + batch_fn)
FORWARD_BACKWARD_S = "forward_backward_s"  # forward + backward of all micro-batches, incl. the loss all-reduce
OPTIMIZER_S = "optimizer_s"  # the rest of the step: clipping, the ZeRO optimizer step, grad norm
CHECKPOINT_SAVE_S = "checkpoint_save_s"  # seconds from the last committed save's start to its commit
LAST_CHECKPOINT_STEP = "last_checkpoint_step"  # step of the last committed checkpoint
LAST_CHECKPOINT_TIME = "last_checkpoint_time"  # unix time of the last commit

# Prometheus metric names (pretrain.metrics.prometheus). Conventions: base units (seconds, bytes, FLOP/s, ratios),
# `_total` for counters. Every series carries the labels run, rank, node, model; never the step.
PROM_PREFIX = "pretrain_"
PROM_STEP = "pretrain_step"
PROM_LOSS = "pretrain_loss"
PROM_VAL_LOSS = "pretrain_validation_loss"
PROM_LR = "pretrain_learning_rate"
PROM_GRAD_NORM = "pretrain_grad_norm"
PROM_TOKENS_PER_S = "pretrain_tokens_per_second"
PROM_SAMPLES_PER_S = "pretrain_samples_per_second"
PROM_FLOPS = "pretrain_model_flops_per_second"  # model FLOP/s per device (the JSONL's tflops_per_device × 1e12)
PROM_MFU = "pretrain_mfu_ratio"  # model FLOP/s ÷ the device's peak; absent unless a peak is known or configured
PROM_STEP_TIME = "pretrain_step_time_seconds"  # histogram of logged steps' wall time
PROM_LAST_STEP_TIME = "pretrain_last_step_time_seconds"  # the last logged step's wall time (straggler views)
PROM_DATA_WAIT = "pretrain_data_wait_seconds"
PROM_FORWARD_BACKWARD = "pretrain_forward_backward_seconds"
PROM_OPTIMIZER = "pretrain_optimizer_seconds"
PROM_DEVICE_MEM_ALLOCATED = "pretrain_device_memory_allocated_bytes"
PROM_DEVICE_MEM_RESERVED = "pretrain_device_memory_reserved_bytes"
PROM_DEVICE_MEM_PEAK = "pretrain_device_memory_peak_bytes"
PROM_HOST_RSS = "pretrain_host_memory_rss_bytes"
PROM_TOKENS_TOTAL = "pretrain_tokens_total"
PROM_SKIPPED_STEPS = "pretrain_skipped_steps_total"
PROM_LOSS_SPIKES = "pretrain_loss_spikes_total"
PROM_SKIPPED_SHARDS = "pretrain_skipped_shards_total"
# Job-wide (summed over ranks, the same number on every rank): read it with max(), not sum().
PROM_DATA_READ_BYTES = "pretrain_data_read_bytes_total"
PROM_CHECKPOINT_SAVE = "pretrain_checkpoint_save_seconds"
PROM_CHECKPOINT_BLOCKING = "pretrain_checkpoint_blocking_seconds"
PROM_LAST_CHECKPOINT_STEP = "pretrain_last_checkpoint_step"
PROM_LAST_CHECKPOINT_TIME = "pretrain_last_checkpoint_timestamp_seconds"
PROM_TARGET_STEPS = "pretrain_target_steps"  # train.steps: a run whose step reached it finished, not stalled
PROM_LAST_STEP_TIMESTAMP = "pretrain_last_step_timestamp_seconds"  # liveness: unix time of the last logged step
PROM_RESTARTS = "pretrain_restarts_total"  # SLURM_RESTART_COUNT or TORCHELASTIC_RESTART_COUNT
# Ranks of the job whose exporter could not start (port in use, ...): they train without /metrics. The same
# job-wide number on every rank that does serve, counted once at startup; read it with max(), not sum().
PROM_EXPORTER_FAILURES = "pretrain_prometheus_exporter_failures_total"
# Preflight's timed all-reduce (ft.preflight_allreduce_mib per rank): bus bandwidth in bytes/s, NCCL-tests' busbw.
PROM_ALLREDUCE_BUS_BANDWIDTH = "pretrain_preflight_allreduce_bus_bandwidth_bytes"
# Goodput (rank 0 only: a job-level account): seconds of the run's wall time by `kind` label, over all attempts.
PROM_GOODPUT = "pretrain_goodput_seconds_total"
PROM_GOODPUT_UNCOMMITTED = "pretrain_goodput_uncommitted_seconds"  # steps since the last committed checkpoint
PROM_BUILD_INFO = "pretrain_build_info"  # 1, labelled with version, config hash and world layout
PROM_LABELS = ("run", "rank", "node", "model")
