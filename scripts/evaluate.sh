#!/usr/bin/env bash
# Evaluate a model or SC-Tune checkpoint with torchrun. Every variable below can be overridden from the
# environment, e.g.:  TASK=rec DATA="data/refcoco_val.jsonl data/refcoco_testA.jsonl" bash scripts/evaluate.sh
set -euo pipefail

TASK="${TASK:-self-consistency}"        # self-consistency | rec | region-caption
MODEL="${MODEL:-output_sc_tune}"        # any supported checkpoint folder (base model or trained output)
DATA="${DATA:-data/held_out.json}"      # annotation file(s); rec accepts several, space-separated
IMAGE_ROOT="${IMAGE_ROOT:-data/images}" # folder the records' "image" paths are relative to
OUTPUT_DIR="${OUTPUT_DIR:-eval_results/${TASK}}"
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"  # processes (GPUs)
BATCH_SIZE="${BATCH_SIZE:-8}"           # samples per generate call, per process
BOX_FORMAT="${BOX_FORMAT:-native}"      # native | generic: the --box_format the model was trained with
DTYPE="${DTYPE:-}"                      # float32 | bfloat16 | float16; empty = bfloat16 on GPU, float32 on CPU
MAX_SAMPLES="${MAX_SAMPLES:-}"          # empty = all records
GRID_SAMPLES="${GRID_SAMPLES:-16}"      # self-consistency: cycles drawn in the PNG grid
MASTER_PORT="${MASTER_PORT:-29511}"
EXTRA_ARGS="${EXTRA_ARGS:-}"            # anything else for evaluate.py, e.g. "--no-meteor"

cd "$(dirname "$0")/.."
read -r -a DATA_FILES <<< "$DATA"
ARGS=("$TASK" --model "$MODEL" --data "${DATA_FILES[@]}" --image-root "$IMAGE_ROOT" --output-dir "$OUTPUT_DIR"
      --batch-size "$BATCH_SIZE" --grid-samples "$GRID_SAMPLES" --box-format "$BOX_FORMAT")
[[ -n "$DTYPE" ]] && ARGS+=(--dtype "$DTYPE")
[[ -n "$MAX_SAMPLES" ]] && ARGS+=(--max-samples "$MAX_SAMPLES")
read -r -a EXTRA <<< "$EXTRA_ARGS"

exec torchrun --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" evaluate.py "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
