#!/usr/bin/env bash
# SC-Tune with torchrun + DeepSpeed, on one node or many. Edit the variables below (or set them in the
# environment: every one is `${NAME:-default}`), then run on every node:
#     sh scripts/finetune_ds.sh
# Multi-node: same command on each node with NNODES, NODE_RANK (0..NNODES-1), MASTER_ADDR (node 0's
# address) and MASTER_PORT set. Extra finetune.py flags go in EXTRA_ARGS (see `python finetune.py --help`).
set -eu
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}

MODEL=${MODEL:-Qwen-VL-Chat/}                  # any supported checkpoint folder (README: supported model families)
IMAGE_DIR=${IMAGE_DIR:-data/objects365}        # Objects365 image root (the records' paths are relative to it)
DATA=${DATA:-data/object365.json}              # annotations: python -m sc_tune.objects365 --help
OUTPUT_DIR=${OUTPUT_DIR:-output_sc_tune}
DS_CONFIG=${DS_CONFIG:-scripts/ds_config_zero2.json}   # or scripts/ds_config_zero3.json
BOX_FORMAT=${BOX_FORMAT:-native}               # native (the family's box text) | generic; evaluate with the same

caption_update_steps=${caption_update_steps:-200}   # describer rollouts per phase (each = ppo_epochs steps)
bbox_update_steps=${bbox_update_steps:-100}         # locator steps per phase
caption_lr=${caption_lr:-5e-7}
bbox_lr=${bbox_lr:-1e-6}
kl_coef=${kl_coef:-0.01}

MAX_STEPS=${MAX_STEPS:-4000}          # the reference's 2,400 batches = 8 cycles = 4,000 optimizer steps
BATCH_PER_GPU=${BATCH_PER_GPU:-16}
SAVE_STEPS=${SAVE_STEPS:-500}         # one cycle
REPORT_TO=${REPORT_TO:-tensorboard}   # tensorboard, wandb or none
EXTRA_ARGS=${EXTRA_ARGS:-}

[ -f .venv/bin/activate ] && . .venv/bin/activate
export TOKENIZERS_PARALLELISM=false

# shellcheck disable=SC2086
torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    finetune.py \
    --model_name_or_path "$MODEL" \
    --box_format "$BOX_FORMAT" \
    --data_path "$DATA" \
    --image_folder "$IMAGE_DIR" \
    --output_dir "$OUTPUT_DIR" \
    --bf16 True \
    --fix_vit True \
    --max_steps "$MAX_STEPS" \
    --per_device_train_batch_size "$BATCH_PER_GPU" \
    --gradient_accumulation_steps 1 \
    --caption_update_steps "$caption_update_steps" \
    --bbox_update_steps "$bbox_update_steps" \
    --caption_lr "$caption_lr" \
    --bbox_lr "$bbox_lr" \
    --kl_coef "$kl_coef" \
    --save_strategy steps \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit 10 \
    --logging_steps 1 \
    --report_to "$REPORT_TO" \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --deepspeed "$DS_CONFIG" \
    $EXTRA_ARGS
