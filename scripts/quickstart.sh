#!/bin/sh
# Quick-start: prove SC-Tune on CPU in minutes (docs/benchmark.md). Sets up .venv (the same install step as
# scripts/test.sh), writes the synthetic shapes data, evaluates the committed warm start
# (checkpoints/warm_start), runs SC-Tune with finetune.py, evaluates again, prints a before/after table and
# writes outputs/quickstart/results.json, results.md and cycles.png.
# Extra arguments go to `python -m sc_tune.synthetic.quickstart` (see --help).
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup_env.sh
. .venv/bin/activate
. scripts/env.sh
# One thread per process: faster than two for this tiny model (docs/benchmark.md, "Threads").
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m sc_tune.synthetic.quickstart --output_dir outputs/quickstart --threads "$OMP_NUM_THREADS" "$@"
