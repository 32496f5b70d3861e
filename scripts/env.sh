# Sourced by the scripts: offline, project-local caches, quiet tokenizers.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$PWD/.cache/matplotlib}"
export HF_HOME="${HF_HOME:-$PWD/.cache/huggingface}"

# sc_tune_launch COMMAND...: run a launch (torchrun and its processes) with its output, stdout and stderr both to
# stdout, through a log; if it fails, repeat the processes' own error lines on stderr after torchrun's failure banner,
# where they are seen. Returns the launch's exit code. Unbuffered, so the logs come as written.
sc_tune_launch() {
    export PYTHONUNBUFFERED=1
    sc_tune_log=$(mktemp "${TMPDIR:-/tmp}/sc_tune_launch.XXXXXX")
    sc_tune_status=$(mktemp "${TMPDIR:-/tmp}/sc_tune_status.XXXXXX")
    trap 'rm -f "$sc_tune_log" "$sc_tune_status"' EXIT
    # Interrupted (Ctrl-C, a scheduler's TERM, a closed terminal): the log copy goes too, and the script stops as the
    # signal's default would (128 + its number).
    trap 'rm -f "$sc_tune_log" "$sc_tune_status"; exit 130' INT
    trap 'rm -f "$sc_tune_log" "$sc_tune_status"; exit 143' TERM
    trap 'rm -f "$sc_tune_log" "$sc_tune_status"; exit 129' HUP
    { if "$@" 2>&1; then echo 0 > "$sc_tune_status"; else echo $? > "$sc_tune_status"; fi; } | tee "$sc_tune_log"
    sc_tune_code=$(cat "$sc_tune_status")
    if [ "$sc_tune_code" != 0 ]; then
        # Each process's last word: an entry point's own "error:" line, or the last line of a Python traceback, with
        # torchrun's "[rankN]: " prefix where it adds one (--tee, or a rank's traceback relayed).
        sc_tune_errors=$(sed -E 's/^\[(default|rank)[0-9]+\]: ?//' "$sc_tune_log" \
            | grep -E '^([a-z_]+\.py: error: |[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Exit)(: |$))' \
            | grep -v -E 'ChildFailedError|torch\.distributed\.elastic' | awk '!seen[$0]++' | head -n 5 || true)
        if [ -n "$sc_tune_errors" ]; then
            printf '\nSC-Tune: the run failed (exit code %s). The error reported by the processes:\n%s\n' \
                "$sc_tune_code" "$sc_tune_errors" >&2
        fi
    fi
    return "$sc_tune_code"
}
