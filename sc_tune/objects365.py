r"""Convert the official Objects365 (COCO-style) annotation file into SC-Tune's annotation JSON.

    python -m sc_tune.objects365 --annotations zhiyuan_objv2_train.json --image_folder /data/objects365 \
        --output data/object365.json --min_area 0.01 --max_boxes_per_image 2 --num_samples 400000 --seed 0 \
        --held_out_output data/held_out.json --num_held_out 2000

With ``--held_out_output``, whole images are set aside (seeded) until ``--num_held_out`` records are reached:
the held-out file (the same format, for ``evaluate.py --task self-consistency``) shares no image with training.

Input: ``{"images": [{"id", "file_name", "width", "height"}], "annotations": [{"image_id", "bbox": [x, y, w, h]
pixels, "iscrowd", "isfake", "isreflected", ...}]}``. Output: ``[{"image": file_name, "bbox": [x1, y1, x2, y2]
normalised, "category_id": ...}]``. Sampling is deterministic for a seed; every filter's count is reported.

Real-world dirt (an annotation whose ``image_id`` names no image, a malformed image or annotation entry, a box
wholly outside its image, a non-finite width, a missing or undecodable image file) is skipped and counted per
reason; ``--strict`` makes the first such record an error that names the file, the entry and the field. A box that
only overruns its image (Objects365's boxes do, by rounding) is clipped to it and counted, not dropped. A conversion
that keeps no record, a held-out split that would leave no training record, and an output path that is an input or
the other output are errors, before anything is written; outputs are written to a temporary file and renamed into
place.

Memory: the v2 train file is about 5 GB of JSON (1.74 M images, 25 M boxes); read whole, Python holds about 4 bytes
per byte of it. The file is instead read one entry at a time (:class:`JsonStream`, Python's own JSON decoder on a
sliding window, so every value is parsed exactly as ``json.load`` parses it), and only what the output can need is
kept: per image its name and size, per box that passed the filters its image, its rounded box as integers of 1e-6
and its category id (compact arrays, about 12 bytes a box). Images are decoded only for the records that are kept
after sampling. The output is the same, byte for byte, as reading the whole file gives with the same seed, except
that an undecodable image among the sampled records drops those records (counted) instead of being left out before
sampling. ``scripts/bench_objects365.py`` measures the memory.
"""

from __future__ import annotations

import argparse
import bisect
import codecs
import json
import math
import os
import random
import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sc_tune import checks
from sc_tune.boxes import MIN_BOX_SIDE, normalize_box, xywh_to_xyxy
from sc_tune.checks import AnnotationError
from sc_tune.images import image_problem
from sc_tune.jsonio import JSONFileError, write_json

DROP_FLAGS = ("iscrowd", "isfake", "isreflected")
CLIPPED = "clipped to the image"  # kept boxes that overran the image, clipped to it
MISSING_FILES = "missing image files (distinct)"  # the distinct files behind "image file missing"
NOT_DROPS = (CLIPPED, MISSING_FILES)  # counts that are notes, not reasons a record was dropped


class ConversionError(ValueError):
    """The conversion would write nothing usable or overwrite an input; the message names the flag or file."""


# ---------------------------------------------------------------------------------------------- streaming JSON
class JsonStream:
    """A JSON file read in chunks: the members of its top-level object one at a time, and the elements of the
    arrays asked for one at a time, each decoded by Python's own decoder (identical values to ``json.load``)."""

    CHUNK = 1 << 22  # characters per read
    LARGEST_ENTRY = 1 << 26  # one array element or member value beyond this is an error, not a reason to read on
    _SPACE = re.compile(r"[ \t\n\r]*")

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._json = json.JSONDecoder()
        self._text, self._pos, self._offset, self._bytes, self._eof = "", 0, 0, 0, False

    def close(self) -> None:
        self._file.close()

    # ------------------------------------------------------------------ low level
    def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = self._file.read(self.CHUNK)
        try:
            text = self._decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise JSONFileError(f"{self.path}: not UTF-8 text (byte {self._bytes + e.start}: {e.reason})") from None
        self._bytes += len(chunk)
        self._eof = not chunk
        self._offset += self._pos
        self._text = self._text[self._pos :] + text
        self._pos = 0
        return True

    def _error(self, message: str, pos: int | None = None) -> JSONFileError:
        where = self._offset + (self._pos if pos is None else pos)
        return JSONFileError(f"{self.path}: not valid JSON ({message} at character {where})")

    def _skip_space(self) -> str:
        """Skip whitespace; the next character ('' at the end of the file)."""
        while True:
            self._pos = self._SPACE.match(self._text, self._pos).end()
            if self._pos < len(self._text) or not self._fill():
                return self._text[self._pos : self._pos + 1]

    def _expect(self, chars: str) -> str:
        found = self._skip_space()
        if not found or found not in chars:
            raise self._error(f"expecting {' or '.join(repr(c) for c in chars)}")
        self._pos += 1
        return found

    def value(self):
        """Decode the next JSON value whole (an array element or a small member value)."""
        self._skip_space()
        while True:
            try:
                value, end = self._json.raw_decode(self._text, self._pos)
            except json.JSONDecodeError as e:
                # Cut off by the window's end (or genuinely invalid): read on, up to a bound, before reporting.
                if not self._eof and len(self._text) - self._pos < self.LARGEST_ENTRY:
                    self._fill()
                    continue
                raise self._error(e.msg, e.pos) from None
            if end == len(self._text) and not self._eof:  # a number may go on past the window: read on
                self._fill()
                continue
            self._pos = end
            return value

    def _type_ahead(self) -> str:
        first = self._skip_space()
        return {"{": "dict", "[": "list", '"': "str", "t": "bool", "f": "bool", "n": "NoneType"}.get(
            first, "float" if first in "-0123456789" else "nothing")

    # ------------------------------------------------------------------ structure
    def members(self, streamed: dict[str, Callable[[int, object], None]],
                after: Callable[[str], None] | None = None) -> list[str]:
        """Walk the top-level object: for a key in ``streamed`` whose value is an array, call
        ``streamed[key](index, element)`` per element; other values are decoded and passed whole as
        ``streamed[key](-1, value)`` (or dropped); ``after(key)`` once a member is read. Returns the keys, in
        file order."""
        if self._skip_space() == "\ufeff":
            raise self._error("Unexpected UTF-8 BOM (decode using utf-8-sig)")
        kind = self._type_ahead()
        if kind != "dict":
            raise AnnotationError(f"{self.path}: expected a JSON object, got {kind}")
        self._expect("{")
        keys: list[str] = []
        if self._skip_space() == "}":
            self._pos += 1
        else:
            while True:
                if self._skip_space() != '"':
                    raise self._error("expecting property name enclosed in double quotes")
                key = self.value()
                keys.append(key)
                self._expect(":")
                handler = streamed.get(key)
                if handler is not None and self._type_ahead() == "list":
                    for index, element in enumerate(self._elements()):
                        handler(index, element)
                elif handler is not None:
                    handler(-1, self.value())
                else:
                    self._skip_value()
                if after is not None:
                    after(key)
                if self._expect(",}") == "}":
                    break
        if self._skip_space():
            raise self._error("Extra data")
        return keys

    def _elements(self) -> Iterator:
        self._expect("[")
        if self._skip_space() == "]":
            self._pos += 1
            return
        while True:
            yield self.value()
            if self._expect(",]") == "]":
                return

    def _skip_value(self) -> None:
        if self._type_ahead() == "list":
            for _ in self._elements():  # element by element: a large array never sits in memory whole
                pass
        else:
            self.value()


# ---------------------------------------------------------------------------------------------- conversion
_ABSENT, _OTHER = -(2**31), -(2**31) + 1  # category_id markers: no field / a value kept aside (not a plain int)


class _Converter:
    """The filters, one entry at a time, keeping compact per-box columns; ``finish`` samples and builds records."""

    def __init__(self, source, image_folder, min_area, max_boxes_per_image, num_samples, seed, drop_flags, strict):
        self.source, self.image_folder, self.min_area = source, image_folder, min_area
        self.max_boxes_per_image, self.num_samples, self.seed = max_boxes_per_image, num_samples, seed
        self.drop_flags, self.strict = drop_flags, strict
        self.counts: Counter = Counter()
        # images, one row per entry in file order: id, file name, size; looked up by id through a sorted index
        # (8 + 4 bytes an image, where a dict of Python ints takes about 100)
        self.image_ids = array("q")
        self.names: list[str] = []
        self.widths, self.heights = array("d"), array("d")
        self.file_state = bytearray()  # 0 not checked, 1 present, 2 missing (--image_folder)
        self.missing_images = 0
        self._sorted_ids: array | None = None
        self._sorted_rows: array | None = None
        # kept boxes, in file order: box in integer millionths, category id, and the next kept box of the same
        # image (a linked list per image: the grouping costs 4 bytes a box, not a sort; it also gives the image)
        self.num_boxes = 0
        self.box_micro = array("i")
        self.box_category = array("i")
        self.box_next = array("i")
        self.first_box, self.last_box = array("i"), array("i")
        self.aside_boxes: dict[int, list[float]] = {}  # boxes that integers cannot give back exactly (-0.0)
        self.aside_categories: dict[int, object] = {}

    def dirty(self, reason: str, error: AnnotationError) -> None:
        if self.strict:
            raise error
        self.counts[reason] += 1

    def add_image(self, i: int, image) -> None:
        where = f"{self.source}: images[{i}]"
        try:
            if not isinstance(image, dict):
                raise AnnotationError(f"{where}: expected an object, got {type(image).__name__}")
            file_name = checks.typed(image, "file_name", str, where)
            width = checks.typed(image, "width", (int, float), where)
            height = checks.typed(image, "height", (int, float), where)
            if not (math.isfinite(width) and math.isfinite(height)):
                raise AnnotationError(f"{where}: fields 'width'/'height' must be finite numbers, got {(width, height)}")
            if width <= 0 or height <= 0:
                raise AnnotationError(f"{where}: fields 'width'/'height' must be > 0, got {(width, height)}")
            image_id = checks.typed(image, "id", int, where)
            if not -(2**63) <= image_id < 2**63:
                raise AnnotationError(f"{where}: field 'id' {image_id} is out of the 64-bit range")
        except AnnotationError as e:
            self.dirty("malformed image entry", e)
            return
        self.image_ids.append(image_id)
        self.names.append(file_name)
        self.widths.append(float(width))
        self.heights.append(float(height))
        self.file_state.append(0)
        self.first_box.append(-1)
        self.last_box.append(-1)
        self._sorted_ids = None

    def _row_of(self, image_id: int) -> int | None:
        """The row of the last image entry with this id (a repeated id replaces the earlier entry, as in a dict)."""
        if self._sorted_ids is None:
            order = np.argsort(np.frombuffer(self.image_ids, dtype=np.int64), kind="stable")
            self._sorted_ids = array("q", np.frombuffer(self.image_ids, dtype=np.int64)[order].tobytes())
            self._sorted_rows = array("q", order.tobytes())
        k = bisect.bisect_right(self._sorted_ids, image_id) - 1
        return self._sorted_rows[k] if k >= 0 and self._sorted_ids[k] == image_id else None

    def _file_missing(self, row: int) -> bool:
        if self.image_folder is None:
            return False
        if self.file_state[row] == 0:
            present = os.path.isfile(os.path.join(self.image_folder, self.names[row]))
            self.file_state[row] = 1 if present else 2
            self.missing_images += not present
        return self.file_state[row] == 2

    def add_annotation(self, i: int, ann) -> None:
        where = f"{self.source}: annotations[{i}]"
        try:
            if not isinstance(ann, dict):
                raise AnnotationError(f"{where}: expected an object, got {type(ann).__name__}")
            image_id = checks.typed(ann, "image_id", int, where)
            box = checks.four_numbers(checks.need(ann, "bbox", where), "bbox", where, layout="[x, y, w, h] in pixels")
        except AnnotationError as e:
            self.dirty("malformed annotation", e)
            return
        row = self._row_of(image_id)
        if row is None:
            self.dirty("image_id not in 'images'",
                       AnnotationError(f"{where}: field 'image_id' {image_id} names no entry of 'images'"))
            return
        if any(ann.get(flag) for flag in self.drop_flags):
            self.counts["flagged (" + "/".join(f for f in self.drop_flags if ann.get(f)) + ")"] += 1
            return
        if box[2] <= 0 or box[3] <= 0:
            self.counts["empty box"] += 1
            return
        width, height = self.widths[row], self.heights[row]
        xyxy = xywh_to_xyxy(box)
        norm = normalize_box(xyxy, width, height)
        # Geometry before area: a box wholly outside its image is a malformed entry (an error with --strict), not
        # a small box; clipped to the image it has no area at all.
        if norm[0] >= norm[2] or norm[1] >= norm[3]:
            self.dirty("outside the image", AnnotationError(
                f"{where}: field 'bbox' {ann['bbox']!r} ([x, y, w, h] in pixels) lies wholly outside its image "
                f"{self.names[row]} ({width:g} x {height:g})"))
            return
        if (norm[2] - norm[0]) * (norm[3] - norm[1]) < self.min_area:
            self.counts["smaller than min_area"] += 1
            return
        if min(norm[2] - norm[0], norm[3] - norm[1]) < MIN_BOX_SIDE:
            # Training refuses it (no family's box grid can write it with an area): not worth writing.
            self.counts["sliver (under 1/1000 of the image wide or high)"] += 1
            return
        if self._file_missing(row):
            self.dirty("image file missing", AnnotationError(f"{where}: image file not found: {self.names[row]}"))
            return
        # Partly outside (real boxes overrun the border by rounding): kept, clipped to the image, and counted.
        if xyxy[0] < 0 or xyxy[1] < 0 or xyxy[2] > width or xyxy[3] > height:
            self.counts[CLIPPED] += 1
        self._keep(row, [round(v, 6) for v in norm], ann)

    def _keep(self, row: int, rounded: list[float], ann: dict) -> None:
        n = self.num_boxes
        self.num_boxes += 1
        self.box_next.append(-1)
        if self.first_box[row] < 0:
            self.first_box[row] = n
        else:
            self.box_next[self.last_box[row]] = n
        self.last_box[row] = n
        micro = [round(v * 1e6) for v in rounded]
        # round(v, 6) is the double nearest a multiple of 1e-6, and so is m / 1e6: equal, except for -0.0.
        if all(m / 1e6 == v and math.copysign(1.0, v) > 0 for m, v in zip(micro, rounded)):
            self.box_micro.extend(micro)
        else:
            self.box_micro.extend((0, 0, 0, 0))
            self.aside_boxes[n] = rounded
        if "category_id" not in ann:
            self.box_category.append(_ABSENT)
        else:
            category = ann["category_id"]
            if type(category) is int and _OTHER < category < 2**31:
                self.box_category.append(category)
            else:
                self.box_category.append(_OTHER)
                self.aside_categories[n] = category

    def _record(self, n: int, row: int) -> dict:
        if n in self.aside_boxes:
            box = self.aside_boxes[n]
        else:
            box = [m / 1e6 for m in self.box_micro[4 * n : 4 * n + 4]]
        record = {"image": self.names[row], "bbox": box}
        category = self.box_category[n]
        if category == _OTHER:
            record["category_id"] = self.aside_categories[n]
        elif category != _ABSENT:
            record["category_id"] = category
        return record

    def finish(self) -> tuple[list[dict], Counter]:
        """Per-image and overall sampling (the same random calls, in the same order, as on whole records), then
        the kept records' images decoded; returns (records, counts)."""
        rng = random.Random(self.seed)
        # Images by id (stable: among equal ids the rows keep file order), each image's boxes in file order.
        kept, kept_rows = array("q"), array("i")
        for row in np.argsort(np.frombuffer(self.image_ids, dtype=np.int64), kind="stable").tolist():
            n = self.first_box[row]
            if n < 0:
                continue
            boxes = []
            while n >= 0:
                boxes.append(n)
                n = self.box_next[n]
            if self.max_boxes_per_image is not None and len(boxes) > self.max_boxes_per_image:
                self.counts["over max_boxes_per_image"] += len(boxes) - self.max_boxes_per_image
                boxes = rng.sample(boxes, self.max_boxes_per_image)
            kept.extend(boxes)
            kept_rows.extend([row] * len(boxes))
        del self.box_next
        if self.num_samples is not None and len(kept) > self.num_samples:
            self.counts["over num_samples"] += len(kept) - self.num_samples
            # Sampling positions picks the same entries as sampling the boxes (random.sample only uses the length).
            chosen = rng.sample(range(len(kept)), self.num_samples)
            kept, kept_rows = array("q", (kept[j] for j in chosen)), array("i", (kept_rows[j] for j in chosen))
        if self.image_folder is not None:
            kept, kept_rows = self._drop_undecodable(kept, kept_rows)
        if self.missing_images:
            self.counts[MISSING_FILES] = self.missing_images
        return [self._record(n, row) for n, row in zip(kept, kept_rows)], self.counts

    def _drop_undecodable(self, kept: array, kept_rows: array) -> tuple[array, array]:
        """Decode each kept record's image once (threads in parallel); records of an undecodable one are dropped."""
        per_row = Counter(kept_rows)
        rows = sorted(per_row, key=lambda row: self.image_ids[row])
        folder = self.image_folder
        with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
            found = pool.map(lambda row: image_problem(os.path.join(folder, self.names[row])), rows)
            problems = {row: problem for row, problem in zip(rows, found) if problem is not None}
        for row in rows:  # in image-id order, so --strict names the first bad image by id
            if row in problems:
                error = AnnotationError(f"{self.source}: image {self.names[row]} (id {self.image_ids[row]}): "
                                        f"{problems[row]}")
                for _ in range(per_row[row]):
                    self.dirty("image file undecodable", error)
        good = [j for j, row in enumerate(kept_rows) if row not in problems]
        return array("q", (kept[j] for j in good)), array("i", (kept_rows[j] for j in good))


def convert(
    coco: dict,
    source: str = "<annotations>",
    image_folder: str | None = None,
    min_area: float = 0.0,
    max_boxes_per_image: int | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    drop_flags: tuple[str, ...] = DROP_FLAGS,
    strict: bool = False,
) -> tuple[list[dict], Counter]:
    """Returns (records, counts of what each filter dropped) for an annotation file already in memory. Dirty
    entries are counted, or with ``strict`` raised as an AnnotationError. :func:`convert_file` streams a file."""
    converter = _Converter(source, image_folder, min_area, max_boxes_per_image, num_samples, seed, drop_flags, strict)
    for i, image in enumerate(checks.typed(coco, "images", list, source)):
        converter.add_image(i, image)
    for i, ann in enumerate(checks.typed(coco, "annotations", list, source)):
        converter.add_annotation(i, ann)
    return converter.finish()


def convert_file(
    path: str,
    image_folder: str | None = None,
    min_area: float = 0.0,
    max_boxes_per_image: int | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    drop_flags: tuple[str, ...] = DROP_FLAGS,
    strict: bool = False,
) -> tuple[list[dict], Counter]:
    """:func:`convert` on a file read one entry at a time (memory: the kept boxes, not the file). Annotations that
    come before the images in the file are read in a second pass, once the images are known."""
    converter = _Converter(path, image_folder, min_area, max_boxes_per_image, num_samples, seed, drop_flags, strict)
    images_read = []  # becomes [True] once the images array has been read: annotations after it are converted
    wrong_type = {}

    def images(i, image):
        if i < 0:  # the value is not a list
            wrong_type["images"] = image
        else:
            converter.add_image(i, image)

    def annotations(i, ann):
        if i < 0:
            wrong_type["annotations"] = ann
        elif images_read:
            converter.add_annotation(i, ann)

    def after(key):
        if key == "images" and "images" not in wrong_type:
            images_read.append(True)

    stream = JsonStream(path)
    try:
        keys = stream.members({"images": images, "annotations": annotations}, after=after)
    finally:
        stream.close()
    for key in ("images", "annotations"):  # the errors, in the order json.load's converter raised them
        if key not in keys:
            raise AnnotationError(f"{path}: missing field {key!r} (has {sorted(keys)})")
        if key in wrong_type:
            raise AnnotationError(f"{path}: field {key!r} must be list, got {wrong_type[key]!r}")
    if keys.index("annotations") < keys.index("images"):  # the images were not known yet: read the annotations again
        stream = JsonStream(path)
        try:
            stream.members({"annotations": converter.add_annotation})
        finally:
            stream.close()
    return converter.finish()


# ---------------------------------------------------------------------------------------------- held-out split
def split_held_out(records: list[dict], num_held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out): whole images go to held_out, in a seeded order, until it has ``num_held_out`` records."""
    by_image: dict[str, int] = Counter(record["image"] for record in records)
    images = sorted(by_image)
    random.Random(f"held_out-{seed}").shuffle(images)
    held_images: set[str] = set()
    held = 0
    for image in images:
        if held >= num_held_out:
            break
        held_images.add(image)
        held += by_image[image]
    train = [r for r in records if r["image"] not in held_images]
    held_out = [r for r in records if r["image"] in held_images]
    return train, held_out


# ---------------------------------------------------------------------------------------------- command
def _write(path: str, records: list[dict]) -> None:
    """One line (``write_json`` writes beside the target, then renames: never half a file where the old one was)."""
    write_json(path, records, indent=None)


def _check_paths(parser: argparse.ArgumentParser, args) -> None:
    """No output may be an input or the other output (each would destroy what it replaces)."""
    named = [("--annotations", args.annotations), ("--output", args.output)]
    if args.held_out_output:
        named.append(("--held_out_output", args.held_out_output))
    seen: dict[str, str] = {}
    for flag, path in named:
        real = os.path.realpath(path)
        if real in seen:
            parser.error(f"{flag} {path} is the same file as {seen[real]}: each output must be a new file, and the "
                         "annotations are never overwritten")
        seen[real] = f"{flag} {path}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sc_tune.objects365", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if not (math.isfinite(args.min_area) and 0 <= args.min_area <= 1):
        parser.error(f"--min_area {args.min_area} must be a fraction of the image in [0, 1]")
    for flag, value in (("--max_boxes_per_image", args.max_boxes_per_image), ("--num_samples", args.num_samples)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value} must be >= 1 (leave it out to keep every record)")
    if args.held_out_output and args.num_held_out < 1:
        parser.error(f"--num_held_out {args.num_held_out} must be >= 1 with --held_out_output")
    _check_paths(parser, args)
    records, counts = convert_file(
        args.annotations,
        args.image_folder,
        args.min_area,
        args.max_boxes_per_image,
        args.num_samples,
        args.seed,
        strict=args.strict,
    )
    dropped = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()) if n and reason not in NOT_DROPS)
    if not records:
        raise ConversionError(f"{args.annotations}: no record is left after filtering ({dropped or 'no annotations'}); "
                              "nothing written")
    held_out = None
    if args.held_out_output:
        train, held_out = split_held_out(records, args.num_held_out, args.seed)
        if not train:
            raise ConversionError(
                f"--num_held_out {args.num_held_out} leaves no training record: {len(records)} records of "
                f"{len({r['image'] for r in records})} images after filtering, and whole images are held out; "
                "lower --num_held_out; nothing written"
            )
        records = train
        _write(args.held_out_output, held_out)
        print(f"wrote {len(held_out)} held-out records to {args.held_out_output}")
    _write(args.output, records)
    print(f"wrote {len(records)} records to {args.output}")
    for reason, n in sorted(counts.items()):
        if n and reason not in NOT_DROPS:
            print(f"  dropped: {reason}: {n}")
    for note in NOT_DROPS:  # not drops: printed after them, and only when there is something to say
        if counts[note]:
            print(f"  {note}: {counts[note]}")


if __name__ == "__main__":
    try:
        main()
    except (AnnotationError, ConversionError, JSONFileError, FileNotFoundError) as e:
        raise SystemExit(f"objects365: error: {e}") from None
