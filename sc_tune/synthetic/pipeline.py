"""The benchmark's steps as functions: data, SC-Tune (``finetune.py`` in a subprocess), evaluation, results.

``scripts/quickstart.sh`` runs one SC-Tune seed; ``scripts/benchmark.py`` runs three seeds and the two
ablations. Both start from the committed warm start ``checkpoints/warm_start`` and evaluate on the same
held-out split, so their "before" row is the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sc_tune.images import load_rgb
from sc_tune.jsonio import read_json
from sc_tune.modeling import load_model_and_adapter
from sc_tune.synthetic.evaluate import DESCRIBE, LOCATE, evaluate_benchmark
from sc_tune.synthetic.shapes import write_dataset
from sc_tune.visualize import save_cycle_grid

REPO = Path(__file__).resolve().parents[2]
WARM_START = REPO / "checkpoints" / "warm_start"

# SC-Tune hyperparameters of the benchmark (the reference defaults are for a 9.6B model: see
# docs/benchmark.md for why each differs). Passed to finetune.py as flags; a variant appends overrides.
SC_TUNE_ARGS = {
    "per_device_train_batch_size": 32,
    "describer_update_steps": 50,
    "locator_update_steps": 25,
    "describer_lr": 1e-4,
    "locator_lr": 3e-5,
    "kl_coef": 0.01,
    "ppo_epochs": 2,
    "describer_top_k": 0,
    "describer_top_p": 1.0,
    "describer_temperature": 1.0,
    # Trained with the budgets the held-out split is evaluated with (8 and 32 tokens).
    "describer_max_new_tokens": DESCRIBE.max_new_tokens,
    "describer_min_new_tokens": 1,
    "locator_max_new_tokens": LOCATE.max_new_tokens,
    "locator_min_new_tokens": 3,
    "weight_decay": 0.0,
    "logging_steps": 10,
    "save_steps": 100000,
    "report_to": "none",
}
# The benchmark's SC-Tune runs: 750 steps, 6 cycles of 50 describer rollouts (100 steps at 2 PPO epochs) and 25
# locator steps; the quick-start and the benchmark script share it.
SC_TUNE_STEPS = 750
VARIANTS = {
    "sc_tune": {},  # the paper's describer baseline, snapshot_greedy
    "no_kl": {"kl_coef": 0.0},
    "no_locator": {"locator_update_steps": 0},
    # The describer's baseline (--describer_baseline), at an equal budget of sampled captions per rollout:
    # 32 boxes x 1 sample, or 8 boxes x 4 samples for group_mean. Its locator phase then sees 8 boxes a step
    # instead of 32 (the batch size is shared by both phases): a confound the benchmark doc states.
    "policy_greedy": {"describer_baseline": "policy_greedy"},
    "group_mean": {"describer_baseline": "group_mean", "num_generations": 4, "per_device_train_batch_size": 8},
    "no_baseline": {"describer_baseline": "none"},
    # A truthfulness remedy: the locator learns only from pseudo-labels its snapshot grounds back to the true box.
    "pseudo_label_filter": {"pseudo_label_min_iou": 0.5},
}
ABLATIONS = ("sc_tune", "no_kl", "no_locator")
BASELINES = ("sc_tune", "policy_greedy", "group_mean", "no_baseline")


def sampled_captions(max_steps: int, overrides: dict | None = None) -> int:
    """How many captions a run samples (its describer budget): rollouts x boxes per rollout x num_generations."""
    from sc_tune.phases import Phase, PhaseSchedule

    args = dict(SC_TUNE_ARGS, **(overrides or {}))
    schedule = PhaseSchedule(int(args["describer_update_steps"]), int(args["locator_update_steps"]),
                             int(args["ppo_epochs"]), 0.0, 0.0)
    rollouts = sum(1 for step in range(max_steps)
                   if (p := schedule.at(step)).phase is Phase.DESCRIBER and p.needs_rollout)
    return rollouts * int(args["per_device_train_batch_size"]) * int(args.get("num_generations", 1))


def parse_overrides(pairs) -> dict:
    """``["kl_coef=0", "describer_lr=1e-4"]`` -> a dict of finetune.py flags (values kept as text)."""
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (a finetune.py flag without its dashes), got {pair!r}")
        overrides[key.lstrip("-")] = value
    return overrides


def source_commit(repo: str | Path = REPO) -> str:
    """The commit the code was measured on: ``git rev-parse --short HEAD``, with ``-dirty`` when tracked files
    differ from it (untracked and ignored files, such as outputs/, do not count). "unknown (...)" says why when
    ``repo`` is not a git checkout, so a table never shows a commit that was not read."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError) as error:
        return f"unknown ({type(error).__name__})"
    return head + ("-dirty" if dirty else "")


def make_data(root: str | Path, seed: int, train_images: int, heldout_images: int) -> dict:
    """The shapes dataset (skipped when ``root/dataset.json`` says it was already written with these sizes)."""
    summary_path = Path(root) / "dataset.json"
    if summary_path.exists():
        summary = read_json(summary_path)
        if (summary["seed"], summary["train"]["images"], summary["heldout"]["images"]) == (seed, train_images,
                                                                                         heldout_images):
            return summary
    return write_dataset(root, seed, train_images, heldout_images)


def final_checkpoint(output_dir: str | Path) -> Path:
    """The folder ``finetune.py`` saved last: ``output_dir`` itself, else its newest ``checkpoint-<step>``."""
    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists():
        return output_dir
    steps = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not steps:
        raise FileNotFoundError(f"finetune.py left no checkpoint in {output_dir}")
    return steps[-1]


def sc_tune_command(model_path, data_root, output_dir, seed: int, max_steps: int, overrides: dict | None = None) -> list[str]:
    args = dict(SC_TUNE_ARGS, **(overrides or {}))
    command = [sys.executable, str(REPO / "finetune.py"), "--model_name_or_path", str(model_path),
               "--data_path", str(Path(data_root) / "train.json"), "--image_folder", str(data_root),
               "--output_dir", str(output_dir), "--max_steps", str(max_steps), "--seed", str(seed),
               "--overwrite_output_dir", "True"]  # a rerun of the benchmark replaces its own earlier run
    for key, value in args.items():
        command += [f"--{key}", str(value)]
    return command


def run_sc_tune(model_path, data_root, output_dir, seed: int, max_steps: int, overrides: dict | None = None,
                threads: int = 1, log_path: str | Path | None = None) -> tuple[Path, float]:
    """Run finetune.py and return (final checkpoint, wall seconds). Its output goes to ``log_path``."""
    command = sc_tune_command(model_path, data_root, output_dir, seed, max_steps, overrides)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path or Path(output_dir) / "finetune.log")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if result.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"finetune.py failed with exit code {result.returncode}; last lines of {log_path}:\n{tail}")
    return final_checkpoint(output_dir), time.perf_counter() - started


def phase_summaries(trainer_state_path: str | Path) -> list[str]:
    """One line per training phase from the Trainer's log history: the describer's reward, baseline, KL and
    clip fraction, or the locator's loss and answer-token accuracy."""
    history = [h for h in read_json(trainer_state_path)["log_history"] if "phase" in h]
    # "phase/describer" is the share of describer steps in a logging window: its majority phase (0 = describer).
    role = [0 if h["phase/describer"] >= 0.5 else 1 for h in history]
    lines, start = [], 0
    for end in range(1, len(history) + 1):
        if end < len(history) and role[end] == role[start]:
            continue
        rows = history[start:end]
        mean = lambda key: sum(r[key] for r in rows if key in r) / max(1, sum(key in r for r in rows))  # noqa: E731
        span = f"steps {rows[0]['step']:>4}-{rows[-1]['step']:>4}"
        if role[start] == 0:
            lines.append(f"describer {span}: reward {mean('describer/reward'):.3f}, baseline "
                         f"{mean('describer/baseline'):.3f}, KL {mean('describer/kl'):+.4f}, clip "
                         f"{mean('describer/clip_frac'):.3f}, parse failures {mean('describer/parse_failure'):.1%}")
        else:
            lines.append(f"locator   {span}: loss {mean('locator/loss'):.4f}, answer-token accuracy "
                         f"{mean('locator/token_acc'):.1%}")
        start = end
    return lines


def evaluate_checkpoint(path, data_root, limit: int | None = None, keep_rows: int = 0, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    model, adapter = load_model_and_adapter(str(path), dtype=torch.float32)
    started = time.perf_counter()
    metrics = evaluate_benchmark(model, adapter, data_root, limit=limit, keep_rows=keep_rows)
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics


def pick_figure_rows(before_rows: list[dict], after_rows: list[dict], count: int = 8) -> tuple[list, list]:
    """Objects for the picture: ambiguous ones first (where captions matter), in data order."""
    order = sorted(range(len(before_rows)), key=lambda i: (not before_rows[i]["ambiguous"], i))[:count]
    return [before_rows[i] for i in order], [after_rows[i] for i in order]


def before_after_grid(before_rows: Sequence[dict], after_rows: Sequence[dict], path: str | Path,
                      columns: int = 4) -> str:
    """The quick-start's PNG, drawn by the project's one cycle grid (:func:`sc_tune.visualize.save_cycle_grid`):
    ``columns`` (before, after) pairs per line. Rows hold ``image`` (a path), ``bbox``, ``caption``, ``pred``
    (None on a parse failure) and ``iou``."""
    if len(before_rows) != len(after_rows):
        raise ValueError(f"{len(before_rows)} 'before' rows for {len(after_rows)} 'after' rows")
    rows = [(tag, row) for pair in zip(before_rows, after_rows) for tag, row in zip(("before", "after"), pair)]
    images = [load_rgb(row["image"]) for _, row in rows]
    return save_cycle_grid(
        path, images, [r["bbox"] for _, r in rows], [f'{tag}: "{r["caption"]}"' for tag, r in rows],
        [r["pred"] for _, r in rows], [r["iou"] for _, r in rows], columns=2 * columns,
        title="held-out cycles: each object before SC-Tune, then after",
    )


TABLE_KEYS = (("cycle_acc50", "cycle Acc@0.5"), ("cycle_acc50_ambiguous", "cycle Acc@0.5 (ambiguous)"),
              ("cycle_iou", "cycle mean IoU"), ("cycle_parse_fail", "cycle parse failures"),
              ("rec_acc50", "REC Acc@0.5"), ("caption_full", "full captions"), ("caption_terse", "terse captions"),
              ("wrong_attribute", "wrong colour or shape"),
              ("wrong_attribute_crowded", "wrong colour or shape (crowded scenes)"))


def before_after_table(before: dict, after: dict) -> str:
    lines = ["| metric (held-out, %d objects) | before (warm start) | after SC-Tune | change |" % before["objects"],
             "| --- | --- | --- | --- |"]
    for key, name in TABLE_KEYS:
        if before[key] is None or after[key] is None:  # e.g. no crowded scene in a small held-out split
            lines.append(f"| {name} | {_percent(before[key])} | {_percent(after[key])} | |")
            continue
        lines.append(f"| {name} | {100 * before[key]:.1f} % | {100 * after[key]:.1f} % | "
                     f"{100 * (after[key] - before[key]):+.1f} |")
    return "\n".join(lines)


def _percent(rate: float | None) -> str:
    return "none measured" if rate is None else f"{100 * rate:.1f} %"
