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
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import HfArgumentParser

from sc_tune import modeling
from sc_tune.arguments import DataArguments, ModelArguments, SCTuneConfig
from sc_tune.help_layout import CompactHelpFormatter
from sc_tune.evaluation import evaluate_rec, evaluate_region_captions, evaluate_self_consistency
from sc_tune.evaluation.distributed import barrier, init_from_env, shutdown
from sc_tune.evaluation.records import (image_problems, load_annotation_records, load_rec_samples,
                                        load_region_caption_records, open_image)
from sc_tune.jsonio import write_json, write_jsonl
from sc_tune.rollout import GenerationSettings
from sc_tune.visualize import save_cycle_grid

logger = logging.getLogger("evaluate")
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
    per_device_eval_batch_size: int = field(
        default=8,
        metadata={"help": "Samples per generate call, per process.", "aliases": ["--batch-size", "--batch_size"]},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Weights' dtype; auto: bfloat16 on a GPU, float32 on the CPU."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N records."})
    describer_max_new_tokens: int = field(
        default=30, metadata={"help": _help(SCTuneConfig, "describer_max_new_tokens")}
    )
    describer_min_new_tokens: int = field(
        default=0, metadata={"help": _help(SCTuneConfig, "describer_min_new_tokens", "(training uses 3)")}
    )
    locator_max_new_tokens: int = field(default=20, metadata={"help": _help(SCTuneConfig, "locator_max_new_tokens")})
    fit_locator_budget: bool = field(
        default=True,
        metadata={"help": "Raise --locator_max_new_tokens when the family's longest box answer needs more (JSON "
                  "boxes take ~28 tokens); --no_fit_locator_budget keeps it as given."},
    )
    grid_samples: int = field(
        default=16, metadata={"help": "self-consistency: cycles drawn in the PNG grid (0: none)."}
    )
    skip_unreadable_images: bool = field(
        default=False,
        metadata={"help": "Leave samples whose image is missing or undecodable out of scoring and list them, with the "
                  "reason, in the metrics file (by default they stop the run before any scoring).",
                  "aliases": ["--skip-unreadable-images"]},
    )
    meteor: bool = field(
        default=True, metadata={"help": "region-caption: METEOR when java and pycocoevalcap are there (--no_meteor)."}
    )

    def __post_init__(self):
        if self.task != "rec" and len(self.data_path) != 1:
            raise ValueError(f"--task {self.task} takes one --data_path file, got {len(self.data_path)}")

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


def load_model_and_adapter(path: str, dtype: torch.dtype, device, box_format: str = "native"):
    model, adapter = modeling.load_model_and_adapter(path, dtype=dtype, box_format=box_format)
    return model.to(device).eval(), adapter


def take(records: list, max_samples: int | None) -> list:
    return records if max_samples is None else records[:max_samples]


def main(argv=None) -> None:
    args = parse_args(argv)
    ranks = init_from_env()
    logging.basicConfig(level=logging.INFO if ranks.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    # Every rank reads and checks the files, so a bad record fails on all ranks alike (no hang).
    tasks = {"self-consistency": load_annotation_records, "rec": load_rec_samples,
             "region-caption": load_region_caption_records}
    datasets = [(path, take(tasks[args.task](path), args.max_samples)) for path in args.data_path]
    # Every image is decoded before any scoring: a bad file found mid-run would throw away the work done.
    unreadable = {}
    for k, (path, records) in enumerate(datasets):
        bad = image_problems(records, args.image_folder)
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
    model, adapter = load_model_and_adapter(args.model_name_or_path, args.torch_dtype, device, args.box_format)
    describe_settings = GenerationSettings(args.describer_max_new_tokens, args.describer_min_new_tokens)
    locate_settings = GenerationSettings(args.locator_max_new_tokens)
    if ranks.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    started = time.monotonic()
    common = {"task": args.task, "model": args.model_name_or_path, "image_folder": args.image_folder,
              "world_size": ranks.world_size, "batch_size_per_process": args.per_device_eval_batch_size,
              "dtype": str(args.torch_dtype).removeprefix("torch.")}
    task_name = args.task.replace("-", "_")
    batch_size = args.per_device_eval_batch_size

    if args.task == "rec":
        results = {}
        for path, samples in datasets:
            metrics, per_sample = evaluate_rec(model, adapter, samples, args.image_folder, batch_size,
                                               locate_settings, fit_budget=args.fit_locator_budget)
            name = os.path.splitext(os.path.basename(path))[0]
            results[name] = {"data": path, **metrics}
            if ranks.is_main:
                write_jsonl(os.path.join(args.output_dir, f"rec_{name}_samples.jsonl"), per_sample)
                logger.info("%s: Acc@0.5 %.4f over %d samples (%d parse failures)", name, metrics["acc@0.5"] or 0,
                            metrics["num_samples"], metrics["num_parse_failures"])
        output = {**common, "locator": vars(locate_settings), "results": results}
    else:
        (path, records), = datasets
        if args.task == "self-consistency":
            metrics, per_sample = evaluate_self_consistency(model, adapter, records, args.image_folder,
                                                            batch_size, describe_settings, locate_settings,
                                                            fit_budget=args.fit_locator_budget)
            settings = {"describer": vars(describe_settings), "locator": vars(locate_settings)}
        else:
            metrics, per_sample = evaluate_region_captions(model, adapter, records, args.image_folder,
                                                           batch_size, describe_settings,
                                                           use_meteor=args.meteor)
            settings = {"describer": vars(describe_settings)}
        output = {**common, "data": path, **settings, "metrics": metrics}
        if ranks.is_main:
            write_jsonl(os.path.join(args.output_dir, f"{task_name}_samples.jsonl"), per_sample)
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
        metrics_path = os.path.join(args.output_dir, f"{task_name}_metrics.json")
        write_json(metrics_path, output)
        print(json.dumps(output, indent=2, ensure_ascii=False))
        logger.info("wrote %s", metrics_path)
    barrier(ranks)
    shutdown(ranks)


if __name__ == "__main__":
    main()
