"""Build the benchmark's warm start: a tiny model trained from scratch on the shapes dataset.

``--model_type`` picks the architecture (default ``qwen3_vl``, the committed ``checkpoints/warm_start``; any
type ``python -m sc_tune.tiny`` builds works, e.g. ``--model_type qwen3_5``), and ``scripts/benchmark.py
--warm_start DIR`` then SC-Tunes and evaluates it.

Deterministic from ``--seed``. The committed ``checkpoints/warm_start`` is ``step_7500`` of

    OMP_NUM_THREADS=1 nice -n 10 python scripts/build_warm_start.py --output_dir outputs/warm_start --seed 0

(the defaults: 8,000 planned steps, cosine schedule; the run was stopped after step 7,500, 89.3 minutes on a shared
core, when its 300-object held-out check gave REC Acc@0.5 86.0 %; ``history.json`` holds every evaluation). Then
``cp outputs/warm_start/step_7500/* outputs/warm_start/history.json checkpoints/warm_start/`` (docs/benchmark.md).

``--init_from DIR`` continues from a saved ``step_<n>`` folder with this run's schedule (e.g. a build whose locator
was still climbing when its schedule ran out); ``--model_type`` must name the folder's family.

One thread, not two: at this model size a step takes about 0.2 s on one thread and 0.28 s on two
(intra-op parallelism costs more than it gives), and two threads collapse to 1.8 s per step when another
process holds one of the two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sc_tune.synthetic.warm_start import WarmStartConfig, train_warm_start  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    for f in dataclasses.fields(WarmStartConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = WarmStartConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WarmStartConfig)})
    final = train_warm_start(cfg, args.output_dir, log=lambda line: print(line, flush=True))
    print("final", final, flush=True)


if __name__ == "__main__":
    main()
