#!/bin/sh
# SC-Tune with torchrun + DeepSpeed, on one node or many. Edit the variables below (or set them in the
# environment: every one is `${NAME:-default}`), then run on every node:
#     sh scripts/finetune_ds.sh
# Multi-node: same command on each node with NNODES, NODE_RANK (0..NNODES-1), MASTER_ADDR (node 0's
# address) and MASTER_PORT set. Extra finetune.py flags go in EXTRA_ARGS (see `python finetune.py --help`).
# A CPU dry run (tiny model, one process, fp32, a few steps):
#     GPUS_PER_NODE=1 PRECISION=fp32 MODEL=... DATA=... IMAGE_FOLDER=... MAX_STEPS=2 BATCH_PER_GPU=2 \
#         GRADIENT_CHECKPOINTING=False DATALOADER_WORKERS=0 REPORT_TO=none sh scripts/finetune_ds.sh
#     (README: the committed warm start and data/sample, with EXTRA_ARGS="--describer_min_new_tokens 1")
# On a machine without a CUDA GPU the script adds --use_cpu True itself (DeepSpeed's CPU ranks need it); on one
# node it picks a free rendezvous port unless MASTER_PORT is set; if the run fails, the processes' own error
# lines are repeated below the launcher's failure banner.
set -eu
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
. scripts/env.sh

# IMAGE_DIR is the earlier name of IMAGE_FOLDER (as in scripts/evaluate.sh and --image_folder); still accepted.
if [ -z "${IMAGE_FOLDER:-}" ] && [ -n "${IMAGE_DIR:-}" ]; then
    echo "note: IMAGE_DIR is now called IMAGE_FOLDER (the old name still works)" >&2
    IMAGE_FOLDER=$IMAGE_DIR
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-}                       # several nodes: 0..NNODES-1, one per node (required there)
MASTER_ADDR=${MASTER_ADDR:-}                   # several nodes: node 0's address (required there); one node: localhost
MASTER_PORT=${MASTER_PORT:-}                   # empty: a free port on one node, 6001 on several (set it on every node)
USE_CPU=${USE_CPU:-auto}                       # auto: --use_cpu True when torch sees no CUDA GPU | True | False

MODEL=${MODEL:-Qwen-VL-Chat/}                  # any supported checkpoint folder (README: supported model families)
IMAGE_FOLDER=${IMAGE_FOLDER:-data/objects365}  # Objects365 image root (the records' paths are relative to it)
DATA=${DATA:-data/object365.json}              # annotations: python -m sc_tune.objects365 --help
OUTPUT_DIR=${OUTPUT_DIR:-output_sc_tune}
DS_CONFIG=${DS_CONFIG-scripts/ds_config_zero2.json}    # or scripts/ds_config_zero3.json; DS_CONFIG= runs without DeepSpeed
PRECISION=${PRECISION:-bf16}                           # bf16 (the reference's) | fp16 | fp32 (CPU dry runs)
BOX_FORMAT=${BOX_FORMAT:-native}               # native (the family's box text) | generic; evaluate with the same
IMAGE_MAX_PIXELS=${IMAGE_MAX_PIXELS:-}         # Qwen2/2.5/3-VL, Qwen3.5/3.8, GLM, EXAONE 4.5, HyperCLOVA X
                                               # Vision v2: at most these pixels per image, e.g. 200704
                                               # (448 x 448); empty: the checkpoint's. Evaluate with the same

# The reference's lower-case names (caption_update_steps, bbox_update_steps, caption_lr, bbox_lr, kl_coef) still work.
DESCRIBER_UPDATE_STEPS=${DESCRIBER_UPDATE_STEPS:-${caption_update_steps:-200}}  # describer rollouts per phase (x ppo_epochs steps)
LOCATOR_UPDATE_STEPS=${LOCATOR_UPDATE_STEPS:-${bbox_update_steps:-100}}         # locator steps per phase
DESCRIBER_LR=${DESCRIBER_LR:-${caption_lr:-5e-7}}
LOCATOR_LR=${LOCATOR_LR:-${bbox_lr:-1e-6}}
KL_COEF=${KL_COEF:-${kl_coef:-0.01}}

MAX_STEPS=${MAX_STEPS:-4000}          # the reference's 2,400 batches = 8 cycles = 4,000 optimizer steps
BATCH_PER_GPU=${BATCH_PER_GPU:-16}
SAVE_STEPS=${SAVE_STEPS:-500}         # one cycle
REPORT_TO=${REPORT_TO:-tensorboard}   # tensorboard, wandb (pip install -e ".[wandb]") or none
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-True}  # --activation_checkpointing (transformers 5's name for gradient checkpointing)
DATALOADER_WORKERS=${DATALOADER_WORKERS:-4}
EXTRA_ARGS=${EXTRA_ARGS:-}
TORCHRUN=${TORCHRUN:-torchrun}        # the launcher
# A scheduler's SIGTERM or SIGUSR1 (SLURM: #SBATCH --signal=USR1@300, minutes before the time limit) makes every
# process save a checkpoint at the end of its step and stop (finetune.py --save_on_signal); torchrun passes the signal
# on and waits up to STOP_GRACE seconds for that before it kills them: set it above a step plus a checkpoint save
# (the scheduler's own kill still comes at the end of its grace period). torchrun waits as long for the others when
# one process has failed, if they hang in a collective with it.
STOP_GRACE=${STOP_GRACE:-120}

case "$PRECISION" in
    bf16) PRECISION_ARGS="--bf16 True" ;;
    fp16) PRECISION_ARGS="--fp16 True" ;;
    fp32) PRECISION_ARGS="" ;;
    *) echo "PRECISION must be bf16, fp16 or fp32, got '$PRECISION'" >&2; exit 2 ;;
esac
sc_tune_stop_grace  # scripts/env.sh: a number of seconds
DS_ARGS=""
if [ -n "$DS_CONFIG" ]; then DS_ARGS="--deepspeed $DS_CONFIG"; fi
PIXEL_ARGS=""
if [ -n "$IMAGE_MAX_PIXELS" ]; then PIXEL_ARGS="--image_max_pixels $IMAGE_MAX_PIXELS"; fi

sc_tune_rendezvous  # scripts/env.sh: NNODES, NODE_RANK, MASTER_ADDR checked; MASTER_PORT picked

CPU_ARGS=""
if [ "$USE_CPU" = auto ]; then
    # No GPU device node: no GPU (and no torch import); otherwise torch decides.
    if { [ -e /dev/nvidia0 ] || [ -e /dev/kfd ]; } && \
        python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        USE_CPU=False
    else
        USE_CPU=True
        echo "note: no CUDA GPU found: running on the CPU (--use_cpu True; USE_CPU=False turns this off)" >&2
    fi
fi
if [ "$USE_CPU" = True ]; then CPU_ARGS="--use_cpu True"; fi

if [ -n "$DS_CONFIG" ] && ! find "$TORCH_EXTENSIONS_DIR" -name '*.so' 2>/dev/null | grep -q .; then
    echo "note: the first DeepSpeed launch on this machine compiles its ops into $TORCH_EXTENSIONS_DIR; that takes" \
        "about 2-3 minutes with no output before the first step. Later launches reuse them." >&2
fi
if [ -n "$DS_CONFIG" ]; then
    # torch waits, silently and for ever, on the lock file of a compile that was killed (every node shares the folder).
    for lock in $(find "$TORCH_EXTENSIONS_DIR" -maxdepth 3 -name lock 2>/dev/null); do
        echo "note: $lock is left by an op compile; if no other launch is compiling now, delete it, or this launch" \
            "waits on it with no output" >&2
    done
fi

# shellcheck disable=SC2086
sc_tune_launch $TORCHRUN --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --shutdown_timeout "$STOP_GRACE" \
    finetune.py \
    --model_name_or_path "$MODEL" \
    --box_format "$BOX_FORMAT" \
    $PIXEL_ARGS \
    --data_path "$DATA" \
    --image_folder "$IMAGE_FOLDER" \
    --output_dir "$OUTPUT_DIR" \
    $PRECISION_ARGS \
    $CPU_ARGS \
    --fix_vit True \
    --max_steps "$MAX_STEPS" \
    --per_device_train_batch_size "$BATCH_PER_GPU" \
    --gradient_accumulation_steps 1 \
    --describer_update_steps "$DESCRIBER_UPDATE_STEPS" \
    --locator_update_steps "$LOCATOR_UPDATE_STEPS" \
    --describer_lr "$DESCRIBER_LR" \
    --locator_lr "$LOCATOR_LR" \
    --kl_coef "$KL_COEF" \
    --save_strategy steps \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit 10 \
    --logging_steps 1 \
    --report_to "$REPORT_TO" \
    --activation_checkpointing "$GRADIENT_CHECKPOINTING" \
    --dataloader_num_workers "$DATALOADER_WORKERS" \
    $DS_ARGS \
    $EXTRA_ARGS
