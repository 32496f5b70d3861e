"""Convert the official Objects365 (COCO-style) annotation file into SC-Tune's annotation JSON.

    python -m sc_tune.objects365 --annotations zhiyuan_objv2_train.json --image_folder /data/objects365 \
        --output data/object365.json --min_area 0.01 --max_boxes_per_image 2 --num_samples 400000 --seed 0 \
        --held_out_output data/held_out.json --num_held_out 2000

With ``--held_out_output``, whole images are set aside (seeded) until ``--num_held_out`` records are reached:
the held-out file (the same format, for ``evaluate.py --task self-consistency``) shares no image with training.

Input: ``{"images": [{"id", "file_name", "width", "height"}], "annotations": [{"image_id", "bbox": [x, y, w, h]
pixels, "iscrowd", "isfake", "isreflected", ...}]}``. Output: ``[{"image": file_name, "bbox": [x1, y1, x2, y2]
normalised, "category_id": ...}]``. Sampling is deterministic for a seed; every filter's count is reported.

Real-world dirt (an annotation whose ``image_id`` names no image, a malformed image or annotation entry, a
missing or undecodable image file) is skipped and counted per reason; ``--strict`` makes the first such
record an error that names the file, the entry and the field.
"""

from __future__ import annotations

import argparse
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from sc_tune.boxes import normalize_box, xywh_to_xyxy
from sc_tune import checks
from sc_tune.checks import AnnotationError
from sc_tune.jsonio import read_json, write_json
from sc_tune.data import image_problem


def convert(
    coco: dict,
    source: str = "<annotations>",
    image_folder: str | None = None,
    min_area: float = 0.0,
    max_boxes_per_image: int | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    drop_flags: tuple[str, ...] = ("iscrowd", "isfake", "isreflected"),
    strict: bool = False,
) -> tuple[list[dict], Counter]:
    """Returns (records, counts of what each filter dropped). Dirty entries are counted, or with ``strict``
    raised as an AnnotationError."""
    counts: Counter = Counter()

    def dirty(reason: str, error: AnnotationError) -> None:
        if strict:
            raise error
        counts[reason] += 1

    images = {}
    for i, image in enumerate(checks.typed(coco, "images", list, source)):
        where = f"{source}: images[{i}]"
        try:
            if not isinstance(image, dict):
                raise AnnotationError(f"{where}: expected an object, got {type(image).__name__}")
            entry = (
                checks.typed(image, "file_name", str, where),
                checks.typed(image, "width", (int, float), where),
                checks.typed(image, "height", (int, float), where),
            )
            if entry[1] <= 0 or entry[2] <= 0:
                raise AnnotationError(f"{where}: fields 'width'/'height' must be > 0, got {entry[1:]}")
            images[checks.typed(image, "id", int, where)] = entry
        except AnnotationError as e:
            dirty("malformed image entry", e)
    missing_images: set[str] = set()
    per_image: dict[int, list[dict]] = defaultdict(list)
    for i, ann in enumerate(checks.typed(coco, "annotations", list, source)):
        where = f"{source}: annotations[{i}]"
        try:
            if not isinstance(ann, dict):
                raise AnnotationError(f"{where}: expected an object, got {type(ann).__name__}")
            image_id = checks.typed(ann, "image_id", int, where)
            box = checks.four_numbers(checks.need(ann, "bbox", where), "bbox", where, layout="[x, y, w, h] in pixels")
        except AnnotationError as e:
            dirty("malformed annotation", e)
            continue
        if image_id not in images:
            dirty(
                "image_id not in 'images'",
                AnnotationError(f"{where}: field 'image_id' {image_id} names no entry of 'images'"),
            )
            continue
        if any(ann.get(flag) for flag in drop_flags):
            counts["flagged (" + "/".join(f for f in drop_flags if ann.get(f)) + ")"] += 1
            continue
        file_name, width, height = images[image_id]
        if box[2] <= 0 or box[3] <= 0:
            counts["empty box"] += 1
            continue
        norm = normalize_box(xywh_to_xyxy(box), width, height)
        if (norm[2] - norm[0]) * (norm[3] - norm[1]) < min_area:
            counts["smaller than min_area"] += 1
            continue
        if norm[0] >= norm[2] or norm[1] >= norm[3]:
            counts["outside the image"] += 1
            continue
        if image_folder is not None and file_name not in missing_images:
            if not os.path.isfile(os.path.join(image_folder, file_name)):
                missing_images.add(file_name)
        if file_name in missing_images:
            dirty("image file missing", AnnotationError(f"{where}: image file not found: {file_name}"))
            continue
        record = {"image": file_name, "bbox": [round(v, 6) for v in norm]}
        if "category_id" in ann:
            record["category_id"] = ann["category_id"]
        per_image[image_id].append(record)
    if image_folder is not None:
        # Decode every kept image once (threads in parallel): a corrupt file is dropped here, not mid-training.
        names = sorted({images[i][0] for i in per_image})
        with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
            problems = dict(zip(names, pool.map(lambda n: image_problem(os.path.join(image_folder, n)), names)))
        for image_id in sorted(per_image):
            problem = problems[images[image_id][0]]
            if problem is not None:
                for _ in per_image.pop(image_id):
                    dirty(
                        "image file undecodable",
                        AnnotationError(f"{source}: image {images[image_id][0]} (id {image_id}): {problem}"),
                    )
    rng = random.Random(seed)
    records = []
    for image_id in sorted(per_image):
        boxes = per_image[image_id]
        if max_boxes_per_image is not None and len(boxes) > max_boxes_per_image:
            counts["over max_boxes_per_image"] += len(boxes) - max_boxes_per_image
            boxes = rng.sample(boxes, max_boxes_per_image)
        records.extend(boxes)
    if num_samples is not None and len(records) > num_samples:
        counts["over num_samples"] += len(records) - num_samples
        records = rng.sample(records, num_samples)
    counts["missing image files (distinct)"] = len(missing_images)
    return records, counts


def split_held_out(records: list[dict], num_held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out): whole images go to held_out, in a seeded order, until it has ``num_held_out`` records."""
    by_image: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_image[record["image"]].append(record)
    images = sorted(by_image)
    random.Random(f"held_out-{seed}").shuffle(images)
    held_images: set[str] = set()
    held = 0
    for image in images:
        if held >= num_held_out:
            break
        held_images.add(image)
        held += len(by_image[image])
    train = [r for r in records if r["image"] not in held_images]
    held_out = [r for r in records if r["image"] in held_images]
    return train, held_out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, help="official Objects365 / COCO-style JSON")
    parser.add_argument("--output", required=True, help="SC-Tune annotation JSON to write")
    parser.add_argument(
        "--image_folder", default=None, help="if given, records whose image file is missing are dropped and counted"
    )
    parser.add_argument("--min_area", type=float, default=0.0, help="minimum box area as a fraction of the image")
    parser.add_argument("--max_boxes_per_image", type=int, default=None)
    parser.add_argument("--num_samples", type=int, default=None, help="keep this many records (seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held_out_output", default=None,
                        help="also write a held-out annotation file (whole images, none of them in --output)")
    parser.add_argument("--num_held_out", type=int, default=2000, help="records in the held-out file")
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first dirty entry instead of skipping and counting it"
    )
    args = parser.parse_args(argv)
    coco = read_json(args.annotations)
    records, counts = convert(
        coco,
        args.annotations,
        args.image_folder,
        args.min_area,
        args.max_boxes_per_image,
        args.num_samples,
        args.seed,
        strict=args.strict,
    )
    if args.held_out_output:
        records, held_out = split_held_out(records, args.num_held_out, args.seed)
        write_json(args.held_out_output, held_out, indent=None)
        print(f"wrote {len(held_out)} held-out records to {args.held_out_output}")
    write_json(args.output, records, indent=None)
    print(f"wrote {len(records)} records to {args.output}")
    for reason, n in sorted(counts.items()):
        print(f"  dropped: {reason}: {n}" if "distinct" not in reason else f"  {reason}: {n}")


if __name__ == "__main__":
    main()
