#!/bin/sh
# Quick-start: prove SC-Tune on CPU in minutes. On a fresh machine this sets up the environment, writes the
# synthetic shapes data, evaluates the committed warm start (checkpoints/warm_start), runs SC-Tune with
# finetune.py, evaluates again, prints a before/after table and writes outputs/quickstart/results.json,
# results.md and cycles.png. Extra arguments go to `python -m sc_tune.synthetic.quickstart` (see --help).
set -eu
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    if [ -f scripts/setup_env.sh ]; then
        sh scripts/setup_env.sh
    else
        python3 -m venv .venv
        .venv/bin/pip install --quiet -r requirements.txt
    fi
fi
. .venv/bin/activate

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false
python -m sc_tune.synthetic.quickstart --output_dir outputs/quickstart --threads "$OMP_NUM_THREADS" "$@"
