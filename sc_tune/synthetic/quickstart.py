"""The quick-start: data -> before -> SC-Tune from the committed warm start -> after -> table, JSON, PNG.

    python -m sc_tune.synthetic.quickstart --output_dir outputs/quickstart

Writes ``results.json`` (``before`` and ``after`` with ``cycle_iou``, ``cycle_acc50``, ``rec_acc50``,
``wrong_attribute``, ``wrong_attribute_crowded``, ..., plus the git ``commit`` it ran on, timings and the exact
finetune.py command), ``results.md`` (the table) and ``cycles.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sc_tune.jsonio import write_json
from sc_tune.synthetic.pipeline import (SC_TUNE_STEPS, WARM_START, before_after_grid, before_after_table,
                                        evaluate_checkpoint, make_data, parse_overrides, phase_summaries,
                                        pick_figure_rows, run_sc_tune, sc_tune_command, source_commit)
from sc_tune.synthetic.shapes import HELDOUT_IMAGES, TRAIN_IMAGES

FIGURE_ROWS = 64  # cycles kept per evaluation for the picture (8 are drawn)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sc_tune.synthetic.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    parser.add_argument("--warm_start", default=str(WARM_START))
    parser.add_argument("--seed", type=int, default=0, help="SC-Tune seed (the data and warm start are fixed)")
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=SC_TUNE_STEPS)
    parser.add_argument("--train_images", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--heldout_images", type=int, default=HELDOUT_IMAGES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest at this size)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a finetune.py flag of the benchmark's SC-Tune settings, e.g. kl_coef=0")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)

    started = time.perf_counter()
    commit = source_commit()  # read before the run: the code that trains and evaluates
    out = Path(args.output_dir)
    data_root = out / "data"
    summary = make_data(data_root, args.data_seed, args.train_images, args.heldout_images)
    print(f"[quickstart] data: {summary['train']['objects']} train objects, {summary['heldout']['objects']} held-out "
          f"objects ({summary['heldout']['ambiguous']} with an ambiguous short caption)", flush=True)
    before = evaluate_checkpoint(args.warm_start, data_root, keep_rows=FIGURE_ROWS, threads=args.threads)
    print(f"[quickstart] before ({before['eval_seconds']:.0f} s): cycle Acc@0.5 {100 * before['cycle_acc50']:.1f} %, "
          f"REC Acc@0.5 {100 * before['rec_acc50']:.1f} %", flush=True)
    print(f"[quickstart] SC-Tune: {args.max_steps} steps (log: {out / 'sc_tune' / 'finetune.log'})", flush=True)
    checkpoint, train_seconds = run_sc_tune(args.warm_start, data_root, out / "sc_tune", args.seed, args.max_steps,
                                            overrides, threads=args.threads)
    for line in phase_summaries(out / "sc_tune" / "trainer_state.json"):
        print(f"[quickstart]   {line}", flush=True)
    # The after-evaluation reloads the exported checkpoint from disk.
    after = evaluate_checkpoint(checkpoint, data_root, keep_rows=FIGURE_ROWS, threads=args.threads)
    table = before_after_table(before, after)
    print(table, flush=True)

    figure = before_after_grid(*pick_figure_rows(before.pop("rows"), after.pop("rows")), out / "cycles.png")
    results = {
        "commit": commit,
        "before": before,
        "after": after,
        "sc_tune_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "checkpoint": str(checkpoint),
        "figure": figure,
        "command": sc_tune_command(args.warm_start, data_root, out / "sc_tune", args.seed, args.max_steps,
                                   overrides)[1:],
        "data": summary,
    }
    write_json(out / "results.json", results)
    (out / "results.md").write_text(table + "\n")
    print(f"[quickstart] wrote {out / 'results.json'}, {out / 'results.md'} and {figure} "
          f"(SC-Tune {train_seconds / 60:.1f} min, total {results['total_seconds'] / 60:.1f} min)", flush=True)
    return results


if __name__ == "__main__":
    main()
