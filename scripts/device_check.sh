#!/bin/sh
# The prepared GPU check of issue 21 (rollouts at hardware speed), for one lent GPU (H200: torch 2.11 + CUDA 13,
# Python 3.12, no network): at most DEADLINE seconds (default 420) in all, each stage under its own timeout.
#
#   sh scripts/device_check.sh          # from the repository root, .whl/ carried; writes everything under $OUT
#
# Stages, in the order their figures matter:
#   0. install the carried wheels from .whl/ into /tmp/site (PYTHONPATH), record the GPU, torch and library
#      versions; an import that fails stops the script;
#   1. gate: toy Qwen2.5-VL and toy Qwen-VL-Chat through the GPU code path (static decoding, CUDA graphs, fused LoRA
#      decoding; transformers' generate), seconds; a failure stops the script here;
#   2. the acceptance figures: Qwen2.5-VL-7B (random init, bf16, LoRA), generation batch 64, describer and locator,
#      per setting in SETTINGS (default fast,compiled,transformers), each printed as it finishes, so the time limit
#      cuts the last first: `fast` (the trainer's CUDA defaults) with a profile of 8 decode steps (where the step's
#      time goes: kernels per step, device busy against wall time, time per kernel class, the costliest kernels;
#      Chrome traces in $OUT/traces), `compiled` (the same through inductor, timed after its compiles, profiled),
#      `transformers` (the same trainer on transformers' decoding loop);
#   2b. in the time left: one decode step's attention at Qwen2.5-VL-7B's shapes, 128 rows, compiled with inductor:
#      transformers' SDPA (which copies the key/value heads under torch.compile) against SC-Tune's decode attention;
#   3. with SIDE_BY_SIDE=1 only (recorded on 2026-12-04): the real-size side-by-side against the reference's pass
#      structure (bench_step.py, full fine-tuning, bf16, describer), in the time left;
#   4. scripts/device_summary.py: the acceptance figures, printed and written to $OUT/acceptance.json; then the
#      logs and the traces are packed into logs.tar and traces.tar (at most 8 files come back from a lent machine).
# Every stage prints as it goes (per setting and phase), so a stage cut by its timeout still leaves its figures.
# DRY=1 runs the same plumbing on a CPU machine at toy size (no wheels, --dry_run), to check the script.
set -u
DRY=${DRY:-0}
SCALE=1
[ "$DRY" = 1 ] && SCALE=6  # a shared CPU is slower than a GPU at toy size
OUT=${OUT:-/tmp/device_check_out}
DEADLINE=${DEADLINE:-420}
[ "$DRY" = 1 ] && DEADLINE=$(( DEADLINE * SCALE ))
SETTINGS=${SETTINGS:-fast,compiled,transformers}
SIDE_BY_SIDE=${SIDE_BY_SIDE:-0}
mkdir -p "$OUT"
START=$(date +%s)
log() { echo "[device_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/device_check.log"; }
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
# run NAME CAP_SECONDS COMMAND...: the command under min(CAP, time left - 15 s); its output in $OUT/NAME.txt
run() {
    name=$1; cap=$(( $2 * SCALE )); shift 2
    budget=$(left); budget=$(( budget - 15 ))
    [ "$budget" -lt "$cap" ] && cap=$budget
    if [ "$cap" -lt 30 ]; then log "$name: skipped ($(left) s left)"; return 124; fi
    log "$name: start (timeout ${cap} s): $*"
    timeout -k 5 "$cap" "$@" > "$OUT/$name.txt" 2>&1
    status=$?
    log "$name: exit $status; last line: $(tail -n 1 "$OUT/$name.txt" | cut -c1-300)"
    return $status
}
summary() { python3 scripts/device_summary.py "$OUT" | tee -a "$OUT/device_check.log"; }

log "stage 0: wheels"
if [ "$DRY" = 1 ]; then
    log "DRY=1: no wheels, CPU, toy sizes"
elif ! timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        > "$OUT/pip.txt" 2>&1; then
    log "pip install failed: stopping (see pip.txt)"; tail -n 5 "$OUT/pip.txt"; exit 1
fi
PYTHONPATH=/tmp/site:$(pwd)
export PYTHONPATH
export TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
if ! timeout 120 python3 -c "import torch, transformers, peft, trl, accelerate, sc_tune.trainer; print('torch', \
torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), \
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'accelerate', \
accelerate.__version__, 'graph generators', hasattr(torch.cuda.CUDAGraph, 'register_generator_state'))" \
        > "$OUT/versions.txt" 2>&1; then
    log "imports failed: stopping (see versions.txt)"; tail -n 5 "$OUT/versions.txt"; exit 1
fi
log "versions: $(tail -n 1 "$OUT/versions.txt")"

if [ "$DRY" = 1 ]; then
    GATE="--dry_run --batch 2"; REAL="--dry_run --configs toy-qwen2.5-vl --batch 2 --units 1"
    BENCH="--config toy-qwen2.5-vl --device cpu --pairs 1 --batch 2 --phases describer"
    ATTENTION="--rows 4 --cache 32 --repeats 3"
else
    GATE="--configs toy-qwen2.5-vl,toy-qwen-vl-chat --batch 4"; REAL="--configs qwen2.5-vl-7b --batch 64 --units 2"
    BENCH="--config qwen2.5-vl-7b --device cuda --pairs 2 --phases describer"
    ATTENTION="--device cuda --dtype bfloat16"
fi

log "stage 1: toy gate on the GPU"
# shellcheck disable=SC2086
if ! run 1_toy_gate 100 python3 scripts/gpu_check.py $GATE --units 1 --settings fast,transformers; then
    log "the toy gate failed: stopping (see 1_toy_gate.txt)"; tail -n 20 "$OUT/1_toy_gate.txt"; exit 1
fi
grep -o '"graph_failures": [0-9]*' "$OUT/1_toy_gate.txt" | sort | uniq -c | tee -a "$OUT/device_check.log"

log "stage 2: Qwen2.5-VL-7B, generation batch 64 (acceptance: describer_fast new_tokens_per_s >= 2000, ratio <= 2.5)"
# shellcheck disable=SC2086
run 2_real_size 330 python3 scripts/gpu_check.py $REAL --settings "$SETTINGS" --profile 8 --profile_dir "$OUT/traces"
grep -o '"acceptance": {[^}]*}' "$OUT/2_real_size.txt" | tee -a "$OUT/device_check.log"

log "stage 2b: one decode step's attention, compiled, transformers' SDPA against SC-Tune's (diagnostic)"
# shellcheck disable=SC2086
run 2b_decode_attention 60 python3 scripts/bench_decode_attention.py $ATTENTION

if [ "$SIDE_BY_SIDE" = 1 ]; then
    log "stage 3: side-by-side (bench_step, full fine-tuning, bf16, batch 8, describer)"
    # shellcheck disable=SC2086
    run 3_bench_step 150 python3 scripts/bench_step.py $BENCH
else
    log "stage 3: side-by-side skipped (SIDE_BY_SIDE=1 runs it)"
fi

log "stage 4: summary"
summary
# At most 8 files come back from a lent machine's $OUT: the figures stay files of their own, the rest is packed
# (the logs in one archive, the traces in another, so an archive over the size limit costs only itself).
if [ -d "$OUT/traces" ]; then
    tar -cf "$OUT/traces.tar" -C "$OUT" traces && rm -rf "$OUT/traces"
fi
extras=""
for name in pip.txt nvidia_smi.txt versions.txt 1_toy_gate.txt; do
    [ -f "$OUT/$name" ] && extras="$extras $name"
done
# shellcheck disable=SC2086
[ -n "$extras" ] && tar -cf "$OUT/logs.tar" -C "$OUT" $extras && (cd "$OUT" && rm -f $extras)
log "done; files: $(ls "$OUT" | tr '\n' ' ')"
