#!/bin/sh
# Evaluate a model or SC-Tune checkpoint with torchrun (uses .venv like the other scripts). Every variable
# below can be overridden from the environment, e.g.:
#     TASK=rec DATA="data/refcoco_val.jsonl data/refcoco_testA.jsonl" IMAGE_FOLDER=data/coco sh scripts/evaluate.sh
# The names match finetune_ds.sh (MODEL, DATA, IMAGE_FOLDER, OUTPUT_DIR) and evaluate.py's flags.
set -eu
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
. scripts/env.sh

# IMAGE_ROOT and IMAGE_DIR are the earlier names of IMAGE_FOLDER; still accepted.
if [ -z "${IMAGE_FOLDER:-}" ] && [ -n "${IMAGE_ROOT:-${IMAGE_DIR:-}}" ]; then
    echo "note: IMAGE_ROOT / IMAGE_DIR are now called IMAGE_FOLDER (the old name still works)" >&2
    IMAGE_FOLDER=${IMAGE_ROOT:-$IMAGE_DIR}
fi

TASK=${TASK:-self-consistency}          # self-consistency | rec | region-caption
MODEL=${MODEL:-output_sc_tune}          # any supported checkpoint folder (base model or trained output)
DATA=${DATA:-data/held_out.json}        # annotation file(s); rec accepts several, space-separated
IMAGE_FOLDER=${IMAGE_FOLDER:-data/objects365}  # folder the records' "image" paths are relative to
OUTPUT_DIR=${OUTPUT_DIR:-eval_results/${TASK}}
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}  # processes (GPUs)
BATCH_SIZE=${BATCH_SIZE:-8}             # samples per generate call, per process
DTYPE=${DTYPE:-auto}                    # auto | float32 | bfloat16 | float16 (auto: bfloat16 on GPU, float32 on CPU)
BOX_FORMAT=${BOX_FORMAT:-native}        # native | generic: the --box_format the model was trained with
IMAGE_MAX_PIXELS=${IMAGE_MAX_PIXELS:-}  # the --image_max_pixels the model was trained with (empty: the checkpoint's)
MAX_SAMPLES=${MAX_SAMPLES:-}            # empty = all records
GRID_SAMPLES=${GRID_SAMPLES:-16}        # self-consistency: cycles drawn in the PNG grid
NNODES=${NNODES:-1}                     # several nodes: the same command on each, as scripts/finetune_ds.sh
NODE_RANK=${NODE_RANK:-}                # several nodes: 0..NNODES-1, one per node (required there)
MASTER_ADDR=${MASTER_ADDR:-}            # several nodes: node 0's address (required there)
MASTER_PORT=${MASTER_PORT:-}            # empty: a free port on one node, 6001 on several
EXTRA_ARGS=${EXTRA_ARGS:-}              # anything else for evaluate.py, e.g. "--no_meteor"
TORCHRUN=${TORCHRUN:-torchrun}          # the launcher
# A scheduler's SIGTERM or SIGUSR1 stops every process after the batch in progress, its rows on disk (the same
# command scores the rest); torchrun passes the signal on and waits up to STOP_GRACE seconds for that before it kills
# them: set it above one batch's time.
STOP_GRACE=${STOP_GRACE:-120}

sc_tune_stop_grace  # scripts/env.sh: a number of seconds
sc_tune_rendezvous  # scripts/env.sh: NNODES, NODE_RANK, MASTER_ADDR checked; MASTER_PORT picked
set --
if [ -n "$MAX_SAMPLES" ]; then set -- --max_samples "$MAX_SAMPLES"; fi
if [ -n "$IMAGE_MAX_PIXELS" ]; then set -- "$@" --image_max_pixels "$IMAGE_MAX_PIXELS"; fi
# If it fails, the processes' own error lines are repeated below torchrun's failure banner (scripts/env.sh).
# shellcheck disable=SC2086  # DATA and EXTRA_ARGS are space-separated lists on purpose
sc_tune_launch $TORCHRUN --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout "$STOP_GRACE" evaluate.py --task "$TASK" \
    --model_name_or_path "$MODEL" --data_path $DATA --image_folder "$IMAGE_FOLDER" --output_dir "$OUTPUT_DIR" \
    --per_device_eval_batch_size "$BATCH_SIZE" --dtype "$DTYPE" --grid_samples "$GRID_SAMPLES" --box_format "$BOX_FORMAT" "$@" $EXTRA_ARGS
