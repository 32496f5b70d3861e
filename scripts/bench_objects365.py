"""Peak memory and time of the Objects365 converter (``python -m sc_tune.objects365``) on synthetic files of the
real Objects365 v2 schema, at several sizes, extrapolated to the real train file (about 5 GB of JSON).

    python scripts/bench_objects365.py                       # 25k and 100k images (~70 MB and ~280 MB of JSON)
    python scripts/bench_objects365.py --images 25000 50000 100000 --keep

Each file is written streaming (``images`` with id/file_name/width/height/license/url, then ``annotations`` with
xywh pixel ``bbox``, area, the iscrowd/isfake/isreflected flags and category_id, then 365 ``categories`` and
``licenses``: the v2 layout), about 14.6 boxes per image as in v2 (25.4 M boxes / 1.74 M images), box sides
log-uniform between 0.5 % and 90 % of the image. Each (size, scenario) is converted in a child process of its own,
which reports its peak RSS (``VmHWM``), so sizes do not contaminate each other. Scenarios: ``readme`` is the
README's command (``--min_area 0.01 --max_boxes_per_image 2 --num_samples 400000`` plus a 2,000-record held-out
split), ``all_boxes`` keeps every box until the per-image sampling (``--min_area 0``), the most the converter holds.
``--num_samples`` and ``--num_held_out`` are scaled with the image count (their README values at 1.74 M images), so
the kept records grow with the file exactly as they would up to the real size, and the slope extrapolates to it.

Printed per size: JSON bytes, peak RSS, wall and CPU seconds. Per scenario: the slope (bytes of RSS per byte of JSON, between the
smallest and the largest size) and the extrapolation to a 5 GB file. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_FILE_BYTES = 5 * 10**9  # zhiyuan_objv2_train.json: about 5 GB, 1.74 M images, 25.4 M boxes
REAL_IMAGES = 1.74e6
BOXES_PER_IMAGE = 25.4e6 / REAL_IMAGES
# The README's command at the real size; --num_samples and --num_held_out are scaled with the image count
# (400,000 and 2,000 at 1.74 M images), so that the kept records grow with the file as they would up to 5 GB.
SCENARIOS = {
    "readme": {"min_area": 0.01, "max_boxes_per_image": 2, "num_samples": 400_000, "num_held_out": 2000},
    "all_boxes": {"min_area": 0.0, "max_boxes_per_image": 2, "num_samples": 400_000, "num_held_out": None},
}


def _dumps(value) -> str:
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


def write_synthetic(path: str, num_images: int, seed: int = 0, boxes_per_image: float = BOXES_PER_IMAGE,
                    dirt: bool = False) -> int:
    """Write a synthetic Objects365 v2 file of ``num_images`` images; returns its size in bytes. ``dirt`` adds the
    entries the converter must skip and count (unknown image ids, malformed boxes, flagged and empty boxes, boxes
    outside the image, a zero-width image, a string id, missing and non-integer category ids, non-ASCII names)."""
    rng = random.Random(seed)
    ids = [100_000 + 3 * i + rng.randrange(3) for i in range(num_images)]
    sizes = [(rng.randint(320, 1024), rng.randint(240, 1024)) for _ in ids]
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"images": [')
        for k, (image_id, (width, height)) in enumerate(zip(ids, sizes)):
            name = f"images/v2/patch{image_id % 51}/objects365_v2_{image_id:08d}.jpg"
            if dirt and k % 17 == 5:
                name = f"images/v2/patch{image_id % 51}/straße_{image_id:08d}.jpg"
            f.write(("" if k == 0 else ", ") + _dumps({"height": height, "id": image_id, "license": 1 + k % 8,
                                                       "width": width, "file_name": name, "url": ""}))
        if dirt:
            f.write(", " + _dumps({"height": 100, "id": 7, "width": 0, "file_name": "zero_width.jpg"}))
            f.write(", " + _dumps({"height": 100, "id": "8", "width": 100, "file_name": "string_id.jpg"}))
            f.write(", " + _dumps("not an object"))
        f.write('], "annotations": [')
        first, ann_id = True, 0
        max_boxes = max(1, round(2 * boxes_per_image - 1))
        for k, (image_id, (width, height)) in enumerate(zip(ids, sizes)):
            for _ in range(rng.randint(1, max_boxes)):
                ann_id += 1
                bw = width * math.exp(rng.uniform(math.log(0.005), math.log(0.9)))
                bh = height * math.exp(rng.uniform(math.log(0.005), math.log(0.9)))
                x, y = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
                ann = {"id": ann_id, "iscrowd": int(rng.random() < 0.01), "isfake": int(rng.random() < 0.005),
                       "area": round(bw * bh, 4), "isreflected": int(rng.random() < 0.005),
                       "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)], "image_id": image_id,
                       "category_id": rng.randint(1, 365)}
                if dirt:
                    kind = ann_id % 23
                    if kind == 1:
                        ann["image_id"] = 3  # names no image
                    elif kind == 2:
                        ann["bbox"] = ann["bbox"][:3]
                    elif kind == 3:
                        del ann["bbox"]
                    elif kind == 4:
                        ann["bbox"][2] = 0.0  # empty
                    elif kind == 5:
                        ann["bbox"][0] = width + 5.0  # outside the image
                    elif kind == 6:
                        del ann["category_id"]
                    elif kind == 7:
                        ann["category_id"] = f"c{ann['category_id']}"
                    elif kind == 8:
                        ann["image_id"] = 7  # the zero-width image (dropped as malformed)
                f.write(("" if first else ", ") + _dumps(ann))
                first = False
        if dirt:
            f.write(", " + _dumps("not an object"))
        f.write('], "categories": [')
        f.write(", ".join(_dumps({"name": f"category {c}", "id": c}) for c in range(1, 366)))
        f.write('], "licenses": [')
        f.write(", ".join(_dumps({"url": f"http://example/{i}", "id": i, "name": f"license {i}"}) for i in range(1, 9)))
        f.write("]}")
    return os.path.getsize(path)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(argv: list[str]) -> None:
    """In a fresh process: run the converter with ``argv`` and print its peak RSS and seconds as JSON."""
    sys.path.insert(0, ROOT)
    from sc_tune import objects365

    started, cpu = time.perf_counter(), time.process_time()
    objects365.main(argv)
    print(json.dumps({"peak_rss_bytes": _peak_rss_bytes(), "seconds": round(time.perf_counter() - started, 2),
                      "cpu_seconds": round(time.process_time() - cpu, 2)}))


def scenario_argv(scenario: str, num_images: int, annotations: str, workdir: str) -> list[str]:
    settings = SCENARIOS[scenario]
    scale = num_images / REAL_IMAGES
    argv = ["--annotations", annotations, "--output", os.path.join(workdir, f"out_{scenario}.json"),
            "--min_area", str(settings["min_area"]), "--max_boxes_per_image", str(settings["max_boxes_per_image"]),
            "--num_samples", str(max(1, round(settings["num_samples"] * scale))), "--seed", "0"]
    if settings["num_held_out"]:
        argv += ["--held_out_output", os.path.join(workdir, f"held_out_{scenario}.json"),
                 "--num_held_out", str(max(1, round(settings["num_held_out"] * scale)))]
    return argv


def measure(argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(argv)],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"converter failed ({' '.join(argv)}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[25_000, 100_000], help="images per synthetic file")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--workdir", default=None, help="where the synthetic files go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child is not None:
        _child(json.loads(args._child))
        return
    if len(args.images) < 2:
        parser.error("--images needs two or more sizes (the slope is measured between them)")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_objects365_")
    os.makedirs(workdir, exist_ok=True)
    runs = []
    for num_images in sorted(args.images):
        path = os.path.join(workdir, f"objects365_synthetic_{num_images}.json")
        started = time.perf_counter()
        size = write_synthetic(path, num_images)
        print(f"{num_images} images: {size / 1e6:.1f} MB of JSON written in {time.perf_counter() - started:.1f} s")
        for scenario in args.scenarios:
            figures = measure(scenario_argv(scenario, num_images, path, workdir))
            runs.append({"scenario": scenario, "images": num_images, "json_bytes": size, **figures})
            print(f"  {scenario}: peak RSS {figures['peak_rss_bytes'] / 1e6:.0f} MB, {figures['seconds']} s "
                  f"({figures['cpu_seconds']} s of CPU)")
        if not args.keep:
            os.remove(path)
    report = {"runs": runs, "real_file_bytes": REAL_FILE_BYTES, "scenarios": {}}
    for scenario in args.scenarios:
        small, large = [r for r in runs if r["scenario"] == scenario][:: len(args.images) - 1]
        slope = (large["peak_rss_bytes"] - small["peak_rss_bytes"]) / (large["json_bytes"] - small["json_bytes"])
        extrapolated = large["peak_rss_bytes"] + slope * (REAL_FILE_BYTES - large["json_bytes"])
        # CPU seconds: on a shared machine the wall clock also counts the other processes' turns.
        seconds_per_gb = large["cpu_seconds"] / large["json_bytes"] * 1e9
        report["scenarios"][scenario] = {
            "rss_bytes_per_json_byte": round(slope, 4),
            "extrapolated_peak_rss_bytes_5gb": round(extrapolated),
            "extrapolated_cpu_seconds_5gb": round(seconds_per_gb * REAL_FILE_BYTES / 1e9),
            "target_bytes": 2 * 10**9,
            "within_target": extrapolated <= 2 * 10**9,
        }
        print(f"{scenario}: {slope:.3f} bytes of RSS per byte of JSON -> {extrapolated / 1e9:.2f} GB peak for a 5 GB "
              f"file (target <= 2 GB), about {seconds_per_gb * 5 / 60:.0f} min of CPU")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
