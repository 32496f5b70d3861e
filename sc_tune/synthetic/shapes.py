"""A synthetic referring dataset of coloured shapes, built so that short captions are often ambiguous.

Each image is a light-grey canvas cut into a ``grid x grid`` layout; 2-4 objects sit in distinct cells,
each a distinct (colour, kind) pair such as "red circle". Every object has one box per cell (the shape
is drawn ``inset`` of the cell away from its edges), so a locator only has to find the right cell to
reach IoU >= 0.5, and the benchmark measures whether captions *say which object*, not box regression.

Captions:

- full: ``"the red circle"`` -- unique within its image by construction (colour-kind pairs never repeat);
- terse: ``"the circle"`` -- ambiguous whenever another circle is in the image (about half the objects).

With the default grid of 4 at 128 px and a 16 px patch with 2x2 merging, each cell is exactly one merged
vision token. Everything is a pure function of the seed: the same seed gives byte-identical PNGs and JSON.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from sc_tune.jsonio import write_json, write_jsonl

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
KINDS = ("circle", "square", "triangle")
BACKGROUND = (200, 200, 200)
# The benchmark's split sizes (with seed 0): every published figure was measured on them (docs/benchmark.md), and the
# quick-start and the benchmark script share them, so that their "before" rows are the same.
TRAIN_IMAGES, HELDOUT_IMAGES = 2000, 400


@dataclass(frozen=True)
class ShapesSpec:
    """Layout of the images. The defaults match the committed warm start; change them together."""

    image_size: int = 128
    grid: int = 4
    min_objects: int = 2
    max_objects: int = 4
    inset: float = 0.1  # gap between the shape and its cell's edge, as a fraction of the cell


@dataclass
class ShapeObject:
    colour: str
    kind: str
    cell: tuple[int, int]  # (column, row)
    bbox: list[float]  # normalised xyxy

    @property
    def full_caption(self) -> str:
        return f"the {self.colour} {self.kind}"

    @property
    def terse_caption(self) -> str:
        return f"the {self.kind}"


@dataclass
class ShapesScene:
    objects: list[ShapeObject] = field(default_factory=list)

    def is_ambiguous(self, index: int) -> bool:
        """True when the terse caption of object ``index`` also fits another object in the scene."""
        kind = self.objects[index].kind
        return sum(o.kind == kind for o in self.objects) > 1


def cell_box(cell: tuple[int, int], spec: ShapesSpec) -> list[float]:
    """Normalised box of a shape drawn in ``cell``, snapped to whole pixels so PNG and box agree."""
    col, row = cell
    cell_px = spec.image_size / spec.grid
    pad = round(spec.inset * cell_px)
    x1, y1 = round(col * cell_px) + pad, round(row * cell_px) + pad
    x2, y2 = round((col + 1) * cell_px) - pad, round((row + 1) * cell_px) - pad
    return [x1 / spec.image_size, y1 / spec.image_size, x2 / spec.image_size, y2 / spec.image_size]


def sample_scene(rng: random.Random, spec: ShapesSpec) -> ShapesScene:
    count = rng.randint(spec.min_objects, spec.max_objects)
    pairs = rng.sample([(c, k) for c in COLOURS for k in KINDS], count)
    cells = rng.sample([(c, r) for r in range(spec.grid) for c in range(spec.grid)], count)
    return ShapesScene([ShapeObject(c, k, cell, cell_box(cell, spec)) for (c, k), cell in zip(pairs, cells)])


def render(scene: ShapesScene, spec: ShapesSpec) -> Image.Image:
    size = spec.image_size
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        # PIL's xy2 is inclusive; the box's x2 is exclusive, hence the -1.
        x1, y1, x2, y2 = (round(v * size) for v in obj.bbox)
        colour = COLOURS[obj.colour]
        if obj.kind == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
        elif obj.kind == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
        else:
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)
    return image


def scene_stream(seed: int, spec: ShapesSpec = ShapesSpec()) -> Iterator[ShapesScene]:
    """An endless deterministic stream of scenes (the warm start samples from it)."""
    rng = random.Random(seed)
    while True:
        yield sample_scene(rng, spec)


# Seeds of the two splits are derived from the user's seed so that train and held-out never share
# a random stream (a held-out image can still coincide with a training image by chance; that is rare
# and identical for every method compared).
SPLIT_OFFSETS = {"train": 0, "heldout": 1_000_003, "warmstart": 2_000_029, "sample": 3_000_017}


def split_seed(seed: int, split: str) -> int:
    return seed * 7_919 + SPLIT_OFFSETS[split]


def write_split(root: str | Path, split: str, num_images: int, seed: int, spec: ShapesSpec = ShapesSpec()) -> dict:
    """Render ``num_images`` scenes under ``root/<split>/`` and write the three annotation files.

    - ``<split>.json``: SC-Tune training format, a list of ``{"image", "bbox", "caption", "terse",
      "ambiguous"}`` with ``image`` relative to ``root`` and a normalised ``bbox``;
    - ``<split>_rec.jsonl``: Qwen-VL ``evaluate_grounding`` format, one ``{"image", "sent", "bbox"
      (pixels xyxy), "width", "height"}`` per object, ``sent`` being the full caption.
    Returns a summary dict.
    """
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = random.Random(split_seed(seed, split))
    records, rec_lines = [], []
    for i in range(num_images):
        scene = sample_scene(rng, spec)
        rel = f"{split}/{i:05d}.png"
        render(scene, spec).save(root / rel, optimize=False)
        for j, obj in enumerate(scene.objects):
            records.append({"image": rel, "bbox": [round(v, 6) for v in obj.bbox], "caption": obj.full_caption,
                            "terse": obj.terse_caption, "ambiguous": scene.is_ambiguous(j)})
            rec_lines.append({"image": rel, "sent": obj.full_caption,
                              "bbox": [round(v * spec.image_size) for v in obj.bbox],
                              "width": spec.image_size, "height": spec.image_size})
    write_json(root / f"{split}.json", records, indent=0)
    write_jsonl(root / f"{split}_rec.jsonl", rec_lines)
    return {"split": split, "images": num_images, "objects": len(records),
            "ambiguous": sum(r["ambiguous"] for r in records)}


def caption_corpus() -> list[str]:
    """Every caption the dataset can produce (the tiny tokenizer is trained on it: one token per word)."""
    full = [f"the {c} {k}" for c in COLOURS for k in KINDS]
    return full + [f"the {k}" for k in KINDS]


def write_dataset(root: str | Path, seed: int, train_images: int = TRAIN_IMAGES,
                  heldout_images: int = HELDOUT_IMAGES, spec: ShapesSpec = ShapesSpec()) -> dict:
    """Both splits under ``root`` (``train.json``, ``heldout.json``, their ``_rec.jsonl`` and PNGs)."""
    summary = {"seed": seed, "spec": spec.__dict__,
               "train": write_split(root, "train", train_images, seed, spec),
               "heldout": write_split(root, "heldout", heldout_images, seed, spec)}
    write_json(Path(root, "dataset.json"), summary)
    return summary


def write_sample(root: str | Path, num_images: int, seed: int, spec: ShapesSpec = ShapesSpec()) -> dict:
    """The repository's bundled smoke-test sample (``data/sample``): ``root/images/NNN.png`` and
    ``root/annotations.json`` in the training format (``image`` relative to ``root``). Drawn from the warm start's
    own domain, so that ``checkpoints/warm_start`` grounds its boxes and the trainer's preflight passes on it."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(split_seed(seed, "sample"))
    records = []
    for i in range(num_images):
        scene = sample_scene(rng, spec)
        rel = f"images/{i:03d}.png"
        render(scene, spec).save(root / rel, optimize=False)
        records += [{"image": rel, "bbox": [round(v, 6) for v in obj.bbox], "caption": obj.full_caption}
                    for obj in scene.objects]
    # One record per line: the file is read by people (data/README.md) as well as by the loader.
    (root / "annotations.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return {"images": num_images, "boxes": len(records)}


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sc_tune.synthetic.shapes",
                                     description="Write the synthetic shapes referring dataset.")
    parser.add_argument("--root", required=True, help="output folder (images and annotation files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_images", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--heldout_images", type=int, default=HELDOUT_IMAGES)
    parser.add_argument("--sample", type=int, default=None, metavar="IMAGES",
                        help="write only the bundled smoke-test sample of IMAGES images (data/sample: 16)")
    args = parser.parse_args(argv)
    if args.sample is not None:
        print(json.dumps(write_sample(args.root, args.sample, args.seed)))
        return
    print(json.dumps(write_dataset(args.root, args.seed, args.train_images, args.heldout_images)))


if __name__ == "__main__":
    main()
