"""Where a warm start's locator goes when it misses: the described object, another object, or nowhere.

    python scripts/diagnose_locator.py --checkpoint outputs/ws_internvl/step_8000 --data outputs/ws_internvl/eval_data

The locator grounds each held-out object's full caption ("the red circle"); its box is compared with every object
of the scene. A locator that finds objects but ignores the caption hits *some* object nearly always and the
described one about 1 / (objects in the scene) of the time, also when the caption's shape alone names the object
(``unique_shape``: no other object in the scene has it). Prints one JSON object: per group (all objects, unique
shape, shared shape), the shares of boxes on the described object, on another object, on none (IoU < 0.5 with every
object), unparsed, and the chance rate 1 / objects.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sc_tune.boxes import box_iou  # noqa: E402
from sc_tune.images import load_rgb  # noqa: E402
from sc_tune.jsonio import read_json  # noqa: E402
from sc_tune.modeling import load_model_and_adapter  # noqa: E402
from sc_tune.rollout import locate  # noqa: E402
from sc_tune.synthetic.evaluate import LOCATE, named_attributes  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="a folder with heldout.json and its images (a build's eval_data)")
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    opts = parser.parse_args(argv)

    torch.set_num_threads(1)
    model, adapter = load_model_and_adapter(opts.checkpoint)
    model.eval()
    every_record = read_json(os.path.join(opts.data, "heldout.json"))
    records = every_record[: opts.objects]
    scenes = defaultdict(list)  # every object of each image, in all of heldout.json
    for record in every_record:
        scenes[record["image"]].append(record)
    counts = {group: defaultdict(int) for group in ("all", "unique_shape", "shared_shape")}
    for start in range(0, len(records), opts.batch):
        part = records[start : start + opts.batch]
        images = [adapter.prepare_image(load_rgb(os.path.join(opts.data, r["image"]))) for r in part]
        with torch.no_grad():
            boxes, _ = locate(model, adapter, images, [r["caption"] for r in part], LOCATE)
        for record, box in zip(part, boxes):
            scene = scenes[record["image"]]
            shape = named_attributes(record["caption"])[1]
            unique = sum(named_attributes(other["caption"])[1] == shape for other in scene) == 1
            if box is None:
                outcome = "unparsed"
            else:
                ious = box_iou(torch.tensor([box] * len(scene)), torch.tensor([o["bbox"] for o in scene]))
                best = int(ious.argmax())
                outcome = ("none" if float(ious[best]) < 0.5
                           else "described" if scene[best]["bbox"] == record["bbox"] else "other_object")
            for group in ("all", "unique_shape" if unique else "shared_shape"):
                counts[group][outcome] += 1
                counts[group]["n"] += 1
                counts[group]["chance"] += 1 / len(scene)
    report = {"checkpoint": opts.checkpoint}
    for group, c in counts.items():
        n = max(1, c["n"])
        report[group] = {"objects": c["n"], "chance": round(c["chance"] / n, 3),
                         **{k: round(c[k] / n, 3) for k in ("described", "other_object", "none", "unparsed")}}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
