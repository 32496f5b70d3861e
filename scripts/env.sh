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
    sc_tune_pid=$(mktemp "${TMPDIR:-/tmp}/sc_tune_pid.XXXXXX")
    trap 'rm -f "$sc_tune_log" "$sc_tune_status" "$sc_tune_pid"' EXIT
    # Interrupted (Ctrl-C, a scheduler's TERM or USR1, a closed terminal): the shell notes the signal and passes it on
    # to the launcher (torchrun, which passes it to the processes), for a signal that reached this shell alone
    # (Kubernetes signals a container's first process; `kill` of the script; SLURM's --signal=B:...). It waits for
    # the launch to end (the processes may be saving a checkpoint: finetune.py --save_on_signal), says how it ended,
    # and stops as the signal's default would (128 + its number).
    sc_tune_signalled=""
    trap 'sc_tune_signalled=130; sc_tune_pass_on INT' INT
    trap 'sc_tune_signalled=143; sc_tune_pass_on TERM' TERM
    trap 'sc_tune_signalled=129; sc_tune_pass_on HUP' HUP
    trap 'sc_tune_signalled=138; sc_tune_pass_on USR1' USR1
    # A scheduler signals every process of the job, the pipeline's too. Its left side notes the signal and records
    # the launch's exit code (and the launcher's pid, for the pass-on); tee ignores it and relays the processes'
    # output until they have ended: dead, it would break their stdout while they save and name a checkpoint. The
    # pipeline runs in the background so that a signal's trap runs at once (a foreground one defers it to the end);
    # the launch keeps this shell's standard input (fd 3), which a background command would lose.
    if [ -r /dev/stdin ]; then exec 3<&0; else exec 3</dev/null; fi  # a closed standard input: /dev/null
    { trap : INT TERM HUP USR1
      if sh -c 'echo $$ > "$0"; exec "$@"' "$sc_tune_pid" "$@" 2>&1 <&3 3<&-; then
          echo 0 > "$sc_tune_status"
      else
          echo $? > "$sc_tune_status"
      fi; } | (trap '' INT TERM HUP USR1; exec tee "$sc_tune_log" 3<&-) &
    exec 3<&-
    # wait returns early (above 128) on each trapped signal, and 0 once the pipeline has ended.
    until wait; do :; done
    trap - INT TERM HUP USR1
    sc_tune_code=$(cat "$sc_tune_status")
    sc_tune_code=${sc_tune_code:-1}  # the pipeline's left side ended without its status: a failure
    sc_tune_stopped=$(sed -E 's/^\[(default|rank)[0-9]+\]: ?//' "$sc_tune_log" | grep -E '^[a-z_]+\.py: stopped by ' \
        | tail -n 1 || true)
    if [ -n "$sc_tune_stopped" ]; then
        # Stopped on a signal after saving a checkpoint (finetune.py --save_on_signal): not a failure to diagnose.
        printf '\nSC-Tune: the run stopped on a signal (exit code %s):\n%s\n' "$sc_tune_code" "$sc_tune_stopped" >&2
        # The signal's status even where this shell did not get it (only torchrun or a rank was signalled, and
        # torchrun exits 1): nothing after the script may take the run for finished, nor for an ordinary failure.
        sc_tune_code=$(python -c 'import re, signal, sys
print(128 + signal.Signals[re.search(r"stopped by (SIG[A-Z0-9]+) ", sys.argv[1]).group(1)])' "$sc_tune_stopped" \
            2>/dev/null || echo "$sc_tune_code")
    elif [ "$sc_tune_code" != 0 ]; then
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
    if [ -n "$sc_tune_signalled" ]; then exit "$sc_tune_signalled"; fi
    return "$sc_tune_code"
}

# sc_tune_pass_on SIGNAL: send SIGNAL to the running launcher (sc_tune_launch's). A signal in the milliseconds before
# the launcher has written its pid waits for it (up to 10 s), rather than being lost.
sc_tune_pass_on() {
    sc_tune_tries=0
    while [ ! -s "$sc_tune_pid" ] && [ "$sc_tune_tries" -lt 100 ]; do
        sleep 0.1
        sc_tune_tries=$((sc_tune_tries + 1))
    done
    sc_tune_launcher=$(cat "$sc_tune_pid" 2>/dev/null || :)
    if [ -n "$sc_tune_launcher" ]; then kill -s "$1" "$sc_tune_launcher" 2>/dev/null || :; fi
}

# STOP_GRACE (finetune_ds.sh, evaluate.sh): how long torchrun waits, after passing a stop signal on, for the processes
# to finish the step or batch in progress (and save) before it kills them (its --shutdown_timeout). Exits 2 unless
# it is a number of seconds: torchrun would fail on it only after the launch had started.
sc_tune_stop_grace() {
    case "$STOP_GRACE" in
        '' | *[!0-9]*) echo "STOP_GRACE must be a number of seconds, got '$STOP_GRACE'" >&2; exit 2 ;;
    esac
}

# sc_tune_rendezvous: check the launch's NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT, give the one-node defaults,
# and pick the port; exits 2 naming a variable that cannot work. On several nodes NODE_RANK and MASTER_ADDR must be
# set on each: the one-node defaults (0, localhost) made two nodes both rank 0, or a node wait for itself, in silence
# until torchrun's rendezvous timed out (15 minutes). The caller passes them on to torchrun.
sc_tune_rendezvous() {
    NNODES=${NNODES:-1}
    case "$NNODES" in
        '' | *[!0-9]* | 0) echo "error: NNODES must be a number of nodes (1, 2, ...), got '$NNODES'" >&2; exit 2 ;;
    esac
    if [ "$NNODES" != 1 ]; then
        if [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
            echo "error: NNODES=$NNODES: set NODE_RANK (0..$((NNODES - 1)), one per node) and MASTER_ADDR (node 0's" \
                "address) on every node" >&2
            exit 2
        fi
        case "$NODE_RANK" in
            *[!0-9]*) echo "error: NODE_RANK must be a number in 0..$((NNODES - 1)), got '$NODE_RANK'" >&2; exit 2 ;;
        esac
        if [ "$NODE_RANK" -ge "$NNODES" ]; then
            echo "error: NODE_RANK $NODE_RANK is not in 0..$((NNODES - 1)) (NNODES=$NNODES)" >&2
            exit 2
        fi
    fi
    NODE_RANK=${NODE_RANK:-0}
    MASTER_ADDR=${MASTER_ADDR:-localhost}
    if [ -z "${MASTER_PORT:-}" ] && [ "$NNODES" = 1 ]; then
        # A fixed default collides with any other job on the machine (EADDRINUSE): ask the kernel for a free one.
        MASTER_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
    elif [ -z "${MASTER_PORT:-}" ]; then
        MASTER_PORT=6001  # several nodes must agree on the port: set MASTER_PORT on every node to change it
    fi
    if [ "$NODE_RANK" = 0 ] && ! python -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", int(sys.argv[1])))' "$MASTER_PORT" 2>/dev/null; then
        echo "error: MASTER_PORT $MASTER_PORT is in use on this machine (another job?): set MASTER_PORT to a free port" \
            "(on every node), or leave it unset on a single node to get a free one" >&2
        exit 2
    fi
    if [ "$NNODES" != 1 ]; then
        # torchrun says nothing while it waits for the other nodes: a node that never starts looked like a hang.
        echo "note: node $NODE_RANK of $NNODES: waiting for every node at $MASTER_ADDR:$MASTER_PORT; if one never" \
            "starts, torchrun gives up after 15 minutes ('waiting for clients'), with no output until then" >&2
    fi
}
