"""Evaluate a VLM or an SC-Tune checkpoint: self-consistency, REC (RefCOCO/+/g) and region captioning.

    python evaluate.py self-consistency --model CKPT --data held_out.json --image-root IMAGES --output-dir OUT
    python evaluate.py rec --model CKPT --data refcoco_val.jsonl [more.jsonl ...] --image-root COCO --output-dir OUT
    python evaluate.py region-caption --model CKPT --data regions.jsonl --image-root IMAGES --output-dir OUT

Several processes: ``torchrun --nproc_per_node N evaluate.py ...`` (or scripts/evaluate.sh); every sample
is scored exactly once whatever N and the batch size. Rank 0 writes ``OUT/<task>_metrics.json`` (with the
sample counts), a per-sample JSONL next to it and, for self-consistency, a PNG grid of cycles.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from sc_tune import modeling
from sc_tune.evaluation import evaluate_rec, evaluate_region_captions, evaluate_self_consistency
from sc_tune.evaluation.distributed import barrier, init_from_env, shutdown
from sc_tune.evaluation.records import (image_problems, load_annotation_records, load_rec_samples,
                                        load_region_caption_records, open_image)
from sc_tune.rollout import GenerationSettings
from sc_tune.visualize import save_cycle_grid

logger = logging.getLogger("evaluate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_adapter(path: str, dtype: torch.dtype, device):
    model, adapter = modeling.load_model_and_adapter(path, dtype=dtype)
    return model.to(device).eval(), adapter


def write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def take(records: list, max_samples: int | None) -> list:
    return records if max_samples is None else records[:max_samples]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("self-consistency", "rec", "region-caption"))
    parser.add_argument("--model", required=True, help="checkpoint folder (base model or SC-Tune output)")
    parser.add_argument("--data", required=True, nargs="+",
                        help="annotation file(s); rec accepts several (e.g. refcoco val, testA, testB)")
    parser.add_argument("--image-root", default="", help="folder the records' 'image' paths are relative to")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per generate call, per process")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--describer-max-new-tokens", type=int, default=30)
    parser.add_argument("--describer-min-new-tokens", type=int, default=0,
                        help="0 by default; training uses 3")
    parser.add_argument("--locator-max-new-tokens", type=int, default=20)
    parser.add_argument("--no-fit-locator-budget", action="store_true",
                        help="keep --locator-max-new-tokens even when the family's longest box answer needs more "
                             "(JSON boxes take ~28 tokens); by default the budget is raised to fit")
    parser.add_argument("--grid-samples", type=int, default=16,
                        help="self-consistency: cycles drawn in the PNG grid (0 = none)")
    parser.add_argument("--no-meteor", action="store_true", help="region-caption: skip METEOR even if Java is there")
    parser.add_argument("--skip-unreadable-images", action="store_true",
                        help="samples whose image is missing or undecodable are left out of scoring and listed, "
                             "with the reason, in the metrics file (by default they stop the run before scoring)")
    return parser.parse_args(argv)


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
    datasets = [(path, take(tasks[args.task](path), args.max_samples)) for path in args.data]
    # Every image is decoded before any scoring: a bad file found mid-run would throw away the work done.
    unreadable = {}
    for k, (path, records) in enumerate(datasets):
        bad = image_problems(records, args.image_root)
        if bad and not args.skip_unreadable_images:
            listed = "; ".join(f"record {i}: {records[i]['image']}: {why}" for i, why in list(bad.items())[:10])
            raise SystemExit(f"{path}: {len(bad)} sample(s) with an unreadable image under --image-root "
                             f"{args.image_root!r}: {listed}{'; ...' if len(bad) > 10 else ''} "
                             "(--skip-unreadable-images leaves them out and lists them in the metrics file)")
        if bad:
            unreadable[path] = [{"record": i, "image": records[i]["image"], "reason": why} for i, why in bad.items()]
            datasets[k] = (path, [r for i, r in enumerate(records) if i not in bad])
            if not datasets[k][1]:
                raise SystemExit(f"{path}: no sample has a readable image")
    if args.task != "rec" and len(datasets) != 1:
        raise SystemExit(f"{args.task} takes one --data file, got {len(datasets)}")
    model, adapter = load_model_and_adapter(args.model, DTYPES[args.dtype], device)
    describe_settings = GenerationSettings(args.describer_max_new_tokens, args.describer_min_new_tokens)
    locate_settings = GenerationSettings(args.locator_max_new_tokens)
    if ranks.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    started = time.monotonic()
    common = {"task": args.task, "model": args.model, "image_root": args.image_root,
              "world_size": ranks.world_size, "batch_size_per_process": args.batch_size, "dtype": args.dtype}
    task_name = args.task.replace("-", "_")

    if args.task == "rec":
        results = {}
        for path, samples in datasets:
            metrics, per_sample = evaluate_rec(model, adapter, samples, args.image_root, args.batch_size,
                                               locate_settings, fit_budget=not args.no_fit_locator_budget)
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
            metrics, per_sample = evaluate_self_consistency(model, adapter, records, args.image_root,
                                                            args.batch_size, describe_settings, locate_settings,
                                                            fit_budget=not args.no_fit_locator_budget)
            settings = {"describer": vars(describe_settings), "locator": vars(locate_settings)}
        else:
            metrics, per_sample = evaluate_region_captions(model, adapter, records, args.image_root,
                                                           args.batch_size, describe_settings,
                                                           use_meteor=not args.no_meteor)
            settings = {"describer": vars(describe_settings)}
        output = {**common, "data": path, **settings, "metrics": metrics}
        if ranks.is_main:
            write_jsonl(os.path.join(args.output_dir, f"{task_name}_samples.jsonl"), per_sample)
            if args.task == "self-consistency" and args.grid_samples > 0 and per_sample:
                shown = per_sample[: args.grid_samples]
                save_cycle_grid(os.path.join(args.output_dir, "self_consistency_cycles.png"),
                                [open_image(args.image_root, s["image"], s["index"]) for s in shown],
                                [s["bbox"] for s in shown], [s["caption"] for s in shown],
                                [s["pred_bbox"] for s in shown], [s["iou"] for s in shown],
                                title=f"{args.model}: describer -> locator (greedy)")
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
