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

#: Keys every logged training step carries.
REQUIRED = (STEP, LOSS, LR, GRAD_NORM, TOKENS_PER_S, STEP_TIME_S)
