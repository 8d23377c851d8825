#!/usr/bin/env bash
# README "Hugging Face both ways": import a Hugging Face model directory at TP=2, continue pretraining it for 20
# steps, export it, and load the export with transformers.
#
#   bash scripts/hf_continue_pretraining.sh HF_DIR CONFIG WORK [--section.key=value ...]
#
# HF_DIR: a local GPT-2 / Llama directory (config.json, safetensors, tokenizer.model); CONFIG: a run config whose
# model section describes it (e.g. configs/llama/tiny.yaml); WORK: where data, the run and the export go. The
# training data is the bundled Shakespeare corpus tokenized with the model's own tokenizer.model, unless DATA names
# a directory that already holds train/ and valid/ shards made with it. NPROC (default 2) processes, TP=2.
set -euo pipefail
HF_DIR=$1 CONFIG=$2 WORK=$3
shift 3
NPROC=${NPROC:-2}
STEPS=${STEPS:-20}
cd "$(dirname "$0")/.."
torchrun=(python -m torch.distributed.run --standalone "--nproc_per_node=$NPROC" -m pretrain)

if [[ -z "${DATA:-}" ]]; then
  DATA=$WORK/data
  seq=$(python -c "import sys; from pretrain.config import load; print(load(sys.argv[1], []).model.seq_length)" \
        "$CONFIG")
  for split in train valid; do
    [[ -f $DATA/$split/manifest.json ]] || pretrain data prepare --bundled "$split" \
      --tokenizer "$HF_DIR/tokenizer.model" --output "$DATA/$split" --seq-length "$seq"
  done
fi
run=(--data.train="$DATA/train" --data.valid="$DATA/valid" --data.tokenizer="$HF_DIR/tokenizer.model"
     --run.dir="$WORK/run" --parallel.tensor=2 "$@")

echo "== 1. import $HF_DIR at TP=2 -> $WORK/run/checkpoints/step_0"
"${torchrun[@]}" import hf --model "$HF_DIR" --config "$CONFIG" --output "$WORK/run/checkpoints" "${run[@]}"
echo "== 2. continue pretraining for $STEPS steps (resumes from step_0)"
"${torchrun[@]}" train "$CONFIG" "${run[@]}" --train.steps="$STEPS" --checkpoint.every_steps="$STEPS" \
  --train.log_every=5
echo "== 3. export -> $WORK/hf"
pretrain export hf --checkpoint "$WORK/run" --output "$WORK/hf"
echo "== 4. load with transformers"
python - "$WORK/hf" <<'PY'
import sys

import transformers

model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=16, do_sample=False)
print(f"transformers: {type(model).__name__} continues {tokenizer.decode(out[0])!r}")
PY
