"""Evaluate a VLM or an SC-Tune checkpoint: self-consistency, REC (RefCOCO/+/g) and region captioning.

    python evaluate.py --task self-consistency --model_name_or_path CKPT --data_path held_out.json \
        --image_folder IMAGES --output_dir OUT
    python evaluate.py --task rec --model_name_or_path CKPT --data_path refcoco_val.jsonl [more.jsonl ...] \
        --image_folder COCO --output_dir OUT
    python evaluate.py --task region-caption --model_name_or_path CKPT --data_path regions.jsonl \
        --image_folder IMAGES --output_dir OUT

The flags are finetune.py's where they mean the same (``--model_name_or_path``, ``--data_path``,
``--image_folder``, ``--describer_max_new_tokens``, ...); the earlier spellings (the task as the first word,
``--model``, ``--data``, ``--image-root``, ``--output-dir``, ``--batch-size``, ``--no-meteor``, ...) are
still accepted. Several processes: ``torchrun --nproc_per_node N evaluate.py ...`` (or scripts/evaluate.sh);
every sample is scored exactly once whatever N and the batch size. Rank 0 writes ``OUT/<task>_metrics.json``
(with the sample counts), a per-sample JSONL next to it and, for self-consistency, a PNG grid of cycles.

Nothing scored is lost: each process writes every scored batch to disk before the next one, and a re-run with the
same settings resumes where an interrupted one stopped (``sc_tune/evaluation/progress.py``). A folder that holds a
finished evaluation of the task is refused unless ``--overwrite_results True``; one run at a time per folder.
"""

# ruff: noqa: E402 (the torchvision check runs before transformers is imported)
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from sc_tune.environment import check_torchvision

check_torchvision()  # before transformers: a torchvision that does not load with this torch breaks its imports

import torch
from transformers import HfArgumentParser

from sc_tune import modeling
from sc_tune.adapters.base import ThinkingCheckpointError
from sc_tune.arguments import ArgumentError, DataArguments, ModelArguments, SCTuneConfig, check_image_pixels
from sc_tune.checkpoints import CheckpointError, check_model_folder
from sc_tune.help_layout import CompactHelpFormatter
from sc_tune.evaluation import evaluate_rec, evaluate_region_captions, evaluate_self_consistency
from sc_tune.evaluation.distributed import barrier, init_from_env, shutdown
from sc_tune.evaluation.runner import DESCRIBE_EVAL, LOCATE_EVAL, EvaluationStopped
from sc_tune.evaluation.progress import (ResultsError, SampleLog, discard_results, fingerprint_records, model_identity,
                                         refuse_finished)
from sc_tune.evaluation.records import (RecordError, image_problems, load_annotation_records, load_rec_samples,
                                        load_region_caption_records, open_image)
from sc_tune.jsonio import JSONFileError, write_json, write_jsonl
from sc_tune.preemption import RecordsSignal, exiting_on
from sc_tune.process_exit import run_command
from sc_tune.run_lock import RunLockError, hold
from sc_tune.rollout import GenerationSettings
from sc_tune.visualize import save_cycle_grid

logger = logging.getLogger("evaluate")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # a scheduler's stop (SLURM, Kubernetes)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASKS = ("self-consistency", "rec", "region-caption")


def _help(cls, name: str, extra: str = "") -> str:
    """The help text of finetune.py's field of the same name: one wording for one meaning."""
    return (cls.__dataclass_fields__[name].metadata["help"] + " " + extra).strip()


@dataclass
class EvaluationArguments:
    task: Literal["self-consistency", "rec", "region-caption"] = field(
        metadata={"help": "self-consistency, rec or region-caption (may also be the first word, without --task)."}
    )
    model_name_or_path: str = field(
        metadata={"help": _help(ModelArguments, "model_name_or_path"), "aliases": ["--model"]}
    )
    data_path: list[str] = field(
        metadata={"help": "Annotation file(s), a JSON list or JSON Lines; rec accepts several (e.g. RefCOCO val, "
                  "testA, testB).", "aliases": ["--data"]}
    )
    output_dir: str = field(metadata={"help": "Where the metrics, the per-sample JSONL and the PNG grid go."})
    image_folder: str = field(
        default="",
        metadata={"help": _help(DataArguments, "image_folder"), "aliases": ["--image-root", "--image_root"]},
    )
    box_format: Literal["native", "generic"] = field(
        default="native",
        metadata={"help": _help(ModelArguments, "box_format", "(evaluate with the one the model was trained with)"),
                  "aliases": ["--box-format"]},
    )
    image_max_pixels: int | None = field(
        default=None, metadata={"help": _help(ModelArguments, "image_max_pixels", "(as in training)")}
    )
    image_min_pixels: int | None = field(
        default=None, metadata={"help": _help(ModelArguments, "image_min_pixels", "(as in training)")}
    )
    per_device_eval_batch_size: int = field(
        default=8,
        metadata={"help": "Samples per generate call, per process.", "aliases": ["--batch-size", "--batch_size"]},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Weights' dtype; auto: bfloat16 on a GPU, float32 on the CPU."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N records."})
    describer_max_new_tokens: int = field(
        default=DESCRIBE_EVAL.max_new_tokens, metadata={"help": _help(SCTuneConfig, "describer_max_new_tokens")}
    )
    describer_min_new_tokens: int = field(
        default=DESCRIBE_EVAL.min_new_tokens,
        metadata={"help": _help(SCTuneConfig, "describer_min_new_tokens", "(training uses 3)")},
    )
    locator_max_new_tokens: int = field(
        default=LOCATE_EVAL.max_new_tokens, metadata={"help": _help(SCTuneConfig, "locator_max_new_tokens")}
    )
    fit_locator_budget: bool = field(
        default=True,
        metadata={"help": "Raise --locator_max_new_tokens to the family's widest documented answer up to its box, "
                  "+ 8 (a Qwen fenced JSON box takes ~35 tokens); --no_fit_locator_budget keeps it as given."},
    )
    grid_samples: int = field(
        default=16, metadata={"help": "self-consistency: cycles drawn in the PNG grid (0: none)."}
    )
    skip_unreadable_images: bool = field(
        default=False,
        metadata={"help": "Leave samples whose image is missing, undecodable or of a size the model's processor "
                  "refuses out of scoring and list them, with the reason, in the metrics file (by default they stop "
                  "the run before any scoring).",
                  "aliases": ["--skip-unreadable-images"]},
    )
    meteor: bool = field(
        default=True, metadata={"help": "region-caption: METEOR when java and pycocoevalcap are there (--no_meteor)."}
    )
    overwrite_results: bool = field(
        default=False,
        metadata={"help": "Replace a finished evaluation in --output_dir, and discard its partial rows (by default a "
                  "finished one is refused and an interrupted one resumes)."},
    )

    def __post_init__(self):
        check_image_pixels(self.image_min_pixels, self.image_max_pixels)
        if self.task != "rec" and len(self.data_path) != 1:
            raise ArgumentError(f"--task {self.task} takes one --data_path file, got {len(self.data_path)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ArgumentError(f"--max_samples {self.max_samples} must be >= 1 (leave it out to evaluate every "
                                "record): metrics over no sample mean nothing")
        for name in ("per_device_eval_batch_size", "describer_max_new_tokens", "locator_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name} {getattr(self, name)} must be >= 1")
        if not 0 <= self.describer_min_new_tokens <= self.describer_max_new_tokens:
            raise ArgumentError(f"--describer_min_new_tokens {self.describer_min_new_tokens} must be in "
                             f"[0, --describer_max_new_tokens {self.describer_max_new_tokens}]")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return DTYPES[self.dtype]


def parse_args(argv=None) -> EvaluationArguments:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TASKS:  # the earlier `evaluate.py TASK ...` form
        argv = ["--task", *argv]
    parser = HfArgumentParser(EvaluationArguments, description=__doc__.split("\n\n")[0],
                              usage="%(prog)s --task TASK --model_name_or_path CKPT --data_path FILE [FILE ...] "
                              "--image_folder DIR --output_dir OUT [options]", formatter_class=CompactHelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def load_model_and_adapter(path: str, dtype: torch.dtype, device, box_format: str = "native",
                           image_min_pixels: int | None = None, image_max_pixels: int | None = None):
    model, adapter = modeling.load_model_and_adapter(path, dtype=dtype, box_format=box_format,
                                                     image_min_pixels=image_min_pixels,
                                                     image_max_pixels=image_max_pixels)
    return model.to(device).eval(), adapter


def take(records: list, max_samples: int | None) -> list:
    return records if max_samples is None else records[:max_samples]


def main(argv=None) -> None:
    args = parse_args(argv)
    ranks = init_from_env()
    logging.basicConfig(level=logging.INFO if ranks.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    task_name = args.task.replace("-", "_")
    metrics_path = os.path.join(args.output_dir, f"{task_name}_metrics.json")
    refuse_finished(metrics_path, args.overwrite_results)  # before any work: a finished evaluation is not replaced
    # One run per output folder (the lock names the other run): two evaluations would interleave their rows. A
    # scheduler's stop signal ends the evaluation with the lock released; the rows scored so far are on disk, and the
    # same command scores the rest. Every rank writes its rows there: on several nodes, one folder they all share.
    # While scoring, the signal is only recorded and every rank stops after the same batch (EvaluationStopped), so
    # that the other nodes stop too instead of failing on a closed connection.
    with exiting_on(STOP_SIGNALS), hold(args.output_dir, ranks.is_main, ranks.world_size, every_rank_writes=True):
        try:
            _evaluate(args, ranks, task_name, metrics_path)
        except EvaluationStopped:
            shutdown(ranks)  # every rank stops at the same agreed batch: no collective is left to wait for
            raise
    barrier(ranks)
    shutdown(ranks)


def _evaluate(args: EvaluationArguments, ranks, task_name: str, metrics_path: str) -> None:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    # Every rank reads and checks the files, so a bad record fails on all ranks alike (no hang).
    tasks = {"self-consistency": load_annotation_records, "rec": load_rec_samples,
             "region-caption": load_region_caption_records}
    datasets = [(path, take(tasks[args.task](path), args.max_samples)) for path in args.data_path]
    check_model_folder(args.model_name_or_path)
    model, adapter = load_model_and_adapter(args.model_name_or_path, args.torch_dtype, device, args.box_format,
                                            args.image_min_pixels, args.image_max_pixels)
    # Every image is decoded, and its size checked as the family's processor (and training) checks it, before any
    # scoring: a bad file found mid-run would throw away the work done, and stop every resumed run at the same place.
    unreadable = {}
    for k, (path, records) in enumerate(datasets):
        bad = image_problems(records, args.image_folder, adapter.image_size_problem)
        if bad and not args.skip_unreadable_images:
            listed = "; ".join(f"record {i}: {records[i]['image']}: {why}" for i, why in list(bad.items())[:10])
            raise SystemExit(f"{path}: {len(bad)} sample(s) with an unreadable image under --image_folder "
                             f"{args.image_folder!r}: {listed}{'; ...' if len(bad) > 10 else ''} "
                             "(--skip_unreadable_images leaves them out and lists them in the metrics file)")
        if bad:
            unreadable[path] = [{"record": i, "image": records[i]["image"], "reason": why} for i, why in bad.items()]
            datasets[k] = (path, [r for i, r in enumerate(records) if i not in bad])
            if not datasets[k][1]:
                raise SystemExit(f"{path}: no sample has a readable image")
    describe_settings = GenerationSettings(args.describer_max_new_tokens, args.describer_min_new_tokens)
    locate_settings = GenerationSettings(args.locator_max_new_tokens)
    names = [f"rec_{os.path.splitext(os.path.basename(path))[0]}" if args.task == "rec" else task_name
             for path, _ in datasets]
    if args.overwrite_results and ranks.is_main:  # every input has been checked: the earlier results may go
        discard_results([metrics_path, os.path.join(args.output_dir, "self_consistency_cycles.png")]
                        + [os.path.join(args.output_dir, f"{n}_samples{end}") for n in names
                           for end in (".jsonl", ".partial")])
    barrier(ranks)
    # What a row depends on: a resumed run reuses rows only if every one of these is unchanged.
    shared_settings = {"task": args.task, "model": model_identity(args.model_name_or_path),
                       "image_folder": os.path.abspath(args.image_folder) if args.image_folder else "",
                       "box_format": args.box_format, "dtype": str(args.torch_dtype),
                       "describer": vars(describe_settings), "locator": vars(locate_settings),
                       "fit_locator_budget": args.fit_locator_budget,
                       # only when set: rows scored before the flags existed still resume
                       **({"image_pixels": list(adapter.image_pixel_limits)} if adapter.image_pixel_limits else {})}

    stop = RecordsSignal(STOP_SIGNALS, "every process stops after the batch in progress, its rows kept; the same "
                                       "command resumes")

    def progress_for(name: str, records: list) -> SampleLog:
        return SampleLog(args.output_dir, name, {**shared_settings, "records": fingerprint_records(records)}, ranks,
                         stop=stop)

    # Scoring: a signal is recorded, and every rank stops after the same batch with its rows on disk (run_sharded's
    # agreement, EvaluationStopped); one after the last batch changes nothing. Before it, exiting_on's handlers.
    with stop.listening():
        started = time.monotonic()
        common = {"task": args.task, "model": args.model_name_or_path, "image_folder": args.image_folder,
                  "world_size": ranks.world_size, "batch_size_per_process": args.per_device_eval_batch_size,
                  "dtype": str(args.torch_dtype).removeprefix("torch."), "box_format": args.box_format,
                  # the settings' locator budget is the one asked for; fitted, the metrics carry the one used
                  "fit_locator_budget": args.fit_locator_budget,
                  **({"image_pixels": list(adapter.image_pixel_limits)} if adapter.image_pixel_limits else {})}
        batch_size = args.per_device_eval_batch_size
        logs = []

        if args.task == "rec":
            results = {}
            for (path, samples), name in zip(datasets, names):
                logs.append(progress_for(name, samples))
                metrics, per_sample = evaluate_rec(model, adapter, samples, args.image_folder, batch_size,
                                                   locate_settings, fit_budget=args.fit_locator_budget,
                                                   progress=logs[-1])
                metrics["num_resumed"] = logs[-1].resumed
                results[name.removeprefix("rec_")] = {"data": path, **metrics}
                if ranks.is_main:
                    write_jsonl(logs[-1].final_path, per_sample)
                    logger.info("%s: Acc@0.5 %.4f over %d samples (%d parse failures)", name, metrics["acc@0.5"] or 0,
                                metrics["num_samples"], metrics["num_parse_failures"])
            output = {**common, "locator": vars(locate_settings), "results": results}
        else:
            (path, records), = datasets
            logs.append(progress_for(names[0], records))
            if args.task == "self-consistency":
                metrics, per_sample = evaluate_self_consistency(model, adapter, records, args.image_folder,
                                                                batch_size, describe_settings, locate_settings,
                                                                fit_budget=args.fit_locator_budget, progress=logs[-1])
                settings = {"describer": vars(describe_settings), "locator": vars(locate_settings)}
            else:
                metrics, per_sample = evaluate_region_captions(model, adapter, records, args.image_folder,
                                                               batch_size, describe_settings,
                                                               use_meteor=args.meteor, progress=logs[-1])
                settings = {"describer": vars(describe_settings)}
            metrics["num_resumed"] = logs[-1].resumed
            output = {**common, "data": path, **settings, "metrics": metrics}
            if ranks.is_main:
                write_jsonl(logs[-1].final_path, per_sample)
                if args.task == "self-consistency" and args.grid_samples > 0 and per_sample:
                    shown = per_sample[: args.grid_samples]
                    save_cycle_grid(os.path.join(args.output_dir, "self_consistency_cycles.png"),
                                    [open_image(args.image_folder, s["image"], s["index"]) for s in shown],
                                    [s["bbox"] for s in shown], [s["caption"] for s in shown],
                                    [s["pred_bbox"] for s in shown], [s["iou"] for s in shown],
                                    title=f"{args.model_name_or_path}: describer -> locator (greedy)")
        if unreadable:
            output["unreadable_images"] = {p: {"count": len(v), "samples": v} for p, v in unreadable.items()}
        output["seconds"] = round(time.monotonic() - started, 2)
        if ranks.is_main:
            write_json(metrics_path, output)  # atomic: a kill mid-write leaves no half file to pass for a finished run
            print(json.dumps(output, indent=2, ensure_ascii=False))
            logger.info("wrote %s", metrics_path)
        for log in logs:  # the final files hold every row now: the partial rows go
            log.finish()
    if stop.received is not None:
        logger.warning("%s came after the last batch: the evaluation finished", stop.received.name)


# Bad input, not a bug: each of these names the file, record or flag; a traceback would bury it.
INPUT_ERRORS = (ArgumentError, CheckpointError, JSONFileError, RecordError, ResultsError, RunLockError,
                ThinkingCheckpointError, FileNotFoundError)

def cli(argv: list[str] | None = None) -> None:
    """The command: input errors in one line naming the file, record or flag; an evaluation stopped on a signal (its
    rows on disk) exits with that signal's status."""
    try:
        main(argv)
    except INPUT_ERRORS as e:
        raise SystemExit(f"evaluate.py: error: {e}") from None
    except EvaluationStopped as e:
        # One line per node, from its local rank 0: each node's script reads its own launch's log for it and exits
        # 128 + n (scripts/env.sh); from global rank 0 alone, every other node's script exited 1, as if it failed.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"evaluate.py: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    run_command(cli)  # in a launch, an exit that no gloo thread can abort (sc_tune.process_exit)
