"""The synthetic self-consistency benchmark: 3 SC-Tune seeds and two ablations, or the describer baselines.

    python scripts/benchmark.py --output_dir outputs/benchmark [--seeds 0 1 2] [--max_steps 600]
    python scripts/benchmark.py --output_dir outputs/benchmark --suite baselines

Variants (all from the committed warm start ``checkpoints/warm_start``, same data and held-out split):

- ``sc_tune``: the full method (describer and locator phases, KL penalty; the snapshot-greedy baseline);
- ``no_kl``: ``--kl_coef 0``;
- ``no_locator``: describer only, ``--locator_update_steps 0``;
- ``policy_greedy``, ``group_mean`` (K = 4 samples per box, 8 boxes per rollout), ``no_baseline``: the other
  ``--describer_baseline`` choices, each sampling as many captions per run as ``sc_tune`` (the table's
  "captions sampled" column states the budget).

``--suite ablations`` (default) runs the first three, ``--suite baselines`` runs ``sc_tune`` and the three
other baselines; ``--variants`` picks any set.

Writes ``results.json`` (every run's metrics) and ``results.md`` (the table, per seed and mean, with the
wrong-attribute rates and the commit each row was measured on). A run whose ``run.json`` exists is not repeated,
so an interrupted benchmark resumes where it stopped; a cell it did not record (a run measured before that metric
existed) reads "n/a".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sc_tune.jsonio import read_json, write_json  # noqa: E402
from sc_tune.synthetic.pipeline import (ABLATIONS, BASELINES, SC_TUNE_STEPS, VARIANTS, WARM_START,  # noqa: E402
                                        evaluate_checkpoint, make_data, parse_overrides, run_sc_tune,
                                        sampled_captions, source_commit)
from sc_tune.synthetic.shapes import HELDOUT_IMAGES, TRAIN_IMAGES  # noqa: E402

COLUMNS = (("cycle_acc50", "cycle Acc@0.5"), ("cycle_acc50_ambiguous", "cycle Acc@0.5 ambiguous"),
           ("cycle_iou", "cycle IoU"), ("rec_acc50", "REC Acc@0.5"), ("caption_full", "full captions"),
           ("cycle_parse_fail", "cycle parse failures"), ("wrong_attribute", "wrong colour or shape"),
           ("wrong_attribute_crowded", "wrong colour or shape, crowded"))
SUITES = {"ablations": ABLATIONS, "baselines": BASELINES}
# A cell whose run was measured before its metric existed (an older run.json): said, never guessed.
NOT_RECORDED = "n/a"


def cached(path: Path, compute):
    if path.exists():
        return read_json(path)
    value = compute()
    value.pop("rows", None)
    value["commit"] = source_commit()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, value)
    return value


def percent(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return NOT_RECORDED if value is None else f"{100 * value:.1f}"


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [r.get(key) for r in rows]
    return None if any(v is None for v in values) else statistics.mean(values)


def table(before: dict, runs: dict, budgets: dict | None = None) -> str:
    """Rates in %; ``budgets``: captions sampled per run of each variant (a column when given). The last column is
    the commit each row was measured on (``source_commit``)."""
    budgets = budgets or {}
    head = ("| run | " + " | ".join(name for _, name in COLUMNS)
            + " | Δ cycle Acc@0.5 | Δ REC Acc@0.5 | SC-Tune min | captions sampled | commit |")
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 6)]
    lines.append("| warm start (before) | " + " | ".join(percent(before, k) for k, _ in COLUMNS)
                 + f" | | | | | {before.get('commit', NOT_RECORDED)} |")
    for variant, by_seed in runs.items():
        rows = list(by_seed.items())
        budget = budgets.get(variant, "")
        for seed, run in rows:
            m = run["after"]
            lines.append(f"| {variant} seed {seed} | " + " | ".join(percent(m, k) for k, _ in COLUMNS)
                         + f" | {100 * (m['cycle_acc50'] - before['cycle_acc50']):+.1f}"
                         + f" | {100 * (m['rec_acc50'] - before['rec_acc50']):+.1f} | {run['seconds'] / 60:.1f}"
                         + f" | {budget} | {run.get('commit', NOT_RECORDED)} |")
        if len(rows) > 1:
            mean = {k: mean_of([r["after"] for _, r in rows], k) for k, _ in COLUMNS}
            sd = statistics.stdev(100 * r["after"]["cycle_acc50"] for _, r in rows)
            minutes = statistics.mean(r["seconds"] for _, r in rows) / 60
            commits = ", ".join(sorted({str(r.get("commit", NOT_RECORDED)) for _, r in rows}))
            lines.append(f"| **{variant} mean** | " + " | ".join(percent(mean, k) for k, _ in COLUMNS)
                         + f" | **{100 * (mean['cycle_acc50'] - before['cycle_acc50']):+.1f}** (sd {sd:.1f})"
                         + f" | {100 * (mean['rec_acc50'] - before['rec_acc50']):+.1f} | {minutes:.1f} | {budget}"
                         + f" | {commits} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/benchmark")
    parser.add_argument("--warm_start", default=str(WARM_START))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--suite", choices=list(SUITES), default="ablations",
                        help="ablations: sc_tune, no_kl, no_locator; baselines: sc_tune and the other "
                        "--describer_baseline choices at an equal budget of sampled captions")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="run these variants instead of a suite's")
    parser.add_argument("--ablation_seeds", type=int, nargs="+", default=None,
                        help="seeds of the ablations (default: the same as --seeds)")
    parser.add_argument("--max_steps", type=int, default=SC_TUNE_STEPS)
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--train_images", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--heldout_images", type=int, default=HELDOUT_IMAGES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest here)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a finetune.py flag of every run, e.g. describer_lr=1e-4")
    args = parser.parse_args(argv)
    common = parse_overrides(args.set)

    out = Path(args.output_dir)
    data_root = out / "data"
    make_data(data_root, args.data_seed, args.train_images, args.heldout_images)
    before = cached(out / "before.json", lambda: evaluate_checkpoint(args.warm_start, data_root, threads=args.threads))
    variants = args.variants or list(SUITES[args.suite])
    budgets = {v: sampled_captions(args.max_steps, {**common, **VARIANTS[v]}) for v in variants}
    print(f"[benchmark] captions sampled per run: {budgets}", flush=True)
    runs: dict = {}
    for variant in variants:
        seeds = args.seeds if variant == "sc_tune" or args.ablation_seeds is None else args.ablation_seeds
        for seed in seeds:
            run_dir = out / variant / f"seed{seed}"
            summary_path = run_dir / "run.json"
            if not summary_path.exists():
                commit = source_commit()  # read before the run: the code that trains and evaluates it
                started = time.perf_counter()
                checkpoint, seconds = run_sc_tune(args.warm_start, data_root, run_dir / "model", seed, args.max_steps,
                                                  {**common, **VARIANTS[variant]}, threads=args.threads)
                after = evaluate_checkpoint(checkpoint, data_root, threads=args.threads)
                after.pop("rows", None)
                write_json(summary_path, {"after": after, "seconds": seconds, "checkpoint": str(checkpoint),
                                          "wall_seconds": time.perf_counter() - started, "commit": commit})
            runs.setdefault(variant, {})[seed] = read_json(summary_path)
            print(f"[benchmark] {variant} seed {seed}: cycle Acc@0.5 "
                  f"{100 * runs[variant][seed]['after']['cycle_acc50']:.1f} % (before {100 * before['cycle_acc50']:.1f} %)",
                  flush=True)
    text = table(before, runs, budgets)
    name = "results" if args.suite == "ablations" and not args.variants else f"results_{args.suite}"
    (out / f"{name}.md").write_text(text + "\n")
    write_json(out / f"{name}.json", {"before": before, "runs": runs, "max_steps": args.max_steps,
                                      "captions_sampled": budgets})
    print(text)


if __name__ == "__main__":
    main()
