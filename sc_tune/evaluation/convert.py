"""Converters from the public annotation files to the evaluation formats. Bad records raise an error that
names the file, the record index and the field.

- ``refer-rec``: the refer toolkit's ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` plus its
  ``instances.json`` (RefCOCO, RefCOCO+, RefCOCOg) -> Qwen-VL evaluate_grounding JSONL, one line per
  sentence: ``{"image", "sent", "bbox": [x1, y1, x2, y2] pixels, "width", "height"}``;
- ``refer-regions``: the same files -> region-caption records, one per referred object, its sentences as
  references: ``{"image", "bbox": normalised xyxy, "captions": [...]}``;
- ``coco-regions``: a COCO-caption-style JSON whose annotations carry a pixel ``bbox`` ([x, y, w, h])
  and a ``caption`` (or ``captions``) -> region-caption records, annotations of the same box merged.

Usage: ``python -m sc_tune.evaluation.convert refer-rec --refs 'refcoco/refs(unc).p'
--instances refcoco/instances.json --split val --image-prefix train2014/ --out data/refcoco_val.jsonl``.

``refs(*).p`` is a Python pickle: only convert files you downloaded from a source you trust.
"""

from __future__ import annotations

import argparse
import os
import pickle

from sc_tune import checks
from sc_tune.boxes import normalize_box, xywh_to_xyxy
from sc_tune.evaluation.records import RecordError, check_rec_samples, check_region_caption_records
from sc_tune.jsonio import JSONFileError, read_json, write_jsonl

REFER_SPLITS = ("train", "val", "test", "testA", "testB")


def _xywh(value, where: str, key: str = "bbox") -> list[float]:
    box = checks.four_numbers(value, key, where, layout="[x, y, w, h] in pixels")
    if box[2] < 0 or box[3] < 0:
        raise RecordError(f"{where}: field {key!r} has a negative width or height: {value!r}")
    return box


def _id(record, key: str, where: str):
    """An id field, usable as a key (a list or an object is not)."""
    value = checks.need(record, key, where)
    try:
        hash(value)
    except TypeError:
        raise RecordError(f"{where}: field {key!r} must be an id (a number or a string), got {value!r}") from None
    return value


def _image_table(data: dict, path: str) -> dict:
    """COCO ``images`` list -> {id: image record}, checked."""
    images = checks.typed(data, "images", list, path)
    table = {}
    for i, image in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = _id(image, "id", where)
        for key in ("file_name", "width", "height"):
            checks.need(image, key, where)
        if not (isinstance(image["width"], (int, float)) and isinstance(image["height"], (int, float))
                and image["width"] > 0 and image["height"] > 0):
            raise RecordError(f"{where}: fields 'width' and 'height' must be positive numbers")
        table[image_id] = image
    return table


def load_refs(path) -> list[dict]:
    """The refer toolkit's refs pickle (written by Python 2; latin-1 decodes its byte strings)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        try:
            refs = pickle.load(f, encoding="latin1")
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a refs file"
            raise RecordError(f"{path}: not a refer refs pickle ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list):
        raise RecordError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _refer_objects(refs_path, instances_path, split: str):
    """(ref, where, image record, xyxy pixel box) for each ref of ``split``."""
    if split not in REFER_SPLITS:
        raise ValueError(f"split must be one of {REFER_SPLITS}, got {split!r}")
    refs = load_refs(refs_path)
    instances_path = os.fspath(instances_path)
    instances = read_json(instances_path)
    images = _image_table(instances, instances_path)
    annotations = {}
    for i, ann in enumerate(checks.typed(instances, "annotations", list, instances_path)):
        annotations[_id(ann, "id", f"{instances_path}: annotations[{i}]")] = (i, ann)
    found = 0
    for r, ref in enumerate(refs):
        where = f"{os.fspath(refs_path)}: ref {r}"
        if checks.need(ref, "split", where) != split:
            continue
        found += 1
        ann_id = _id(ref, "ann_id", where)
        if ann_id not in annotations:
            raise RecordError(f"{where}: field 'ann_id' = {ann_id!r} is not in {instances_path}")
        a, ann = annotations[ann_id]
        image_id = _id(ann, "image_id", f"{instances_path}: annotations[{a}]")
        if image_id not in images:
            raise RecordError(f"{instances_path}: annotations[{a}]: field 'image_id' = {image_id!r} has no image")
        box = xywh_to_xyxy(_xywh(checks.need(ann, "bbox", f"{instances_path}: annotations[{a}]"),
                                 f"{instances_path}: annotations[{a}]"))
        yield ref, where, images[image_id], box
    if found == 0:
        raise RecordError(f"{os.fspath(refs_path)}: no ref has split {split!r}")


def _sentences(ref, where: str, field: str) -> list[str]:
    sentences = checks.need(ref, "sentences", where)
    if not isinstance(sentences, list) or not sentences:
        raise RecordError(f"{where}: field 'sentences' must be a non-empty list")
    texts = []
    for s, sentence in enumerate(sentences):
        text = checks.need(sentence, field, f"{where}: sentences[{s}]")
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{where}: sentences[{s}]: field {field!r} must be a non-empty string")
        texts.append(text.strip())
    return texts


def refer_to_rec(refs_path, instances_path, split: str, image_prefix: str = "",
                 sentence_field: str = "sent") -> list[dict]:
    """RefCOCO/+/g refs of ``split`` -> evaluate_grounding samples, one per sentence."""
    samples = []
    for ref, where, image, box in _refer_objects(refs_path, instances_path, split):
        for text in _sentences(ref, where, sentence_field):
            samples.append({"image": image_prefix + image["file_name"], "sent": text, "bbox": box,
                            "width": image["width"], "height": image["height"]})
    return check_rec_samples(samples, f"converted {os.fspath(refs_path)}")


def refer_to_region_captions(refs_path, instances_path, split: str, image_prefix: str = "",
                             sentence_field: str = "sent") -> list[dict]:
    """RefCOCO/+/g refs of ``split`` -> region-caption records (the ref's sentences as references)."""
    records = []
    for ref, where, image, box in _refer_objects(refs_path, instances_path, split):
        records.append({"image": image_prefix + image["file_name"],
                        "bbox": normalize_box(box, image["width"], image["height"]),
                        "captions": _sentences(ref, where, sentence_field)})
    return check_region_caption_records(records, f"converted {os.fspath(refs_path)}")


def coco_regions_to_region_captions(path, image_prefix: str = "") -> list[dict]:
    """COCO-caption-style JSON with per-annotation pixel boxes -> region-caption records."""
    path = os.fspath(path)
    data = read_json(path)
    images = _image_table(data, path)
    grouped: dict = {}
    for i, ann in enumerate(checks.typed(data, "annotations", list, path)):
        where = f"{path}: annotations[{i}]"
        image_id = _id(ann, "image_id", where)
        if image_id not in images:
            raise RecordError(f"{where}: field 'image_id' = {image_id!r} is not in 'images'")
        box = _xywh(checks.need(ann, "bbox", where), where)
        captions = checks.reference_captions(ann, where)
        grouped.setdefault((image_id, tuple(box)), []).extend(c.strip() for c in captions)
    if not grouped:
        raise RecordError(f"{path}: field 'annotations' is empty: no region to convert")
    records = []
    for (image_id, box), captions in grouped.items():
        image = images[image_id]
        records.append({"image": image_prefix + image["file_name"],
                        "bbox": normalize_box(xywh_to_xyxy(box), image["width"], image["height"]),
                        "captions": captions})
    return check_region_caption_records(records, f"converted {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sc_tune.evaluation.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("refer-rec", "refer-regions"):
        p = sub.add_parser(name)
        p.add_argument("--refs", required=True, help="refs(unc).p, refs(umd).p or refs(google).p")
        p.add_argument("--instances", required=True, help="the instances.json next to it")
        p.add_argument("--split", required=True, choices=REFER_SPLITS)
        p.add_argument("--sentence-field", default="sent", choices=("sent", "raw"),
                       help="'sent' (lower-cased, tokenised; what Qwen-VL's files use) or 'raw'")
    p = sub.add_parser("coco-regions")
    p.add_argument("--annotations", required=True)
    for p in sub.choices.values():
        p.add_argument("--image-prefix", default="", help="prepended to file_name, e.g. 'train2014/'")
        p.add_argument("--out", required=True, help="output .jsonl")
    args = parser.parse_args(argv)
    if os.path.isdir(args.out):
        sub.choices[args.command].error(f"--out {args.out} is a folder: give the .jsonl file to write")
    # A bad input file is the user's to fix: one line naming the file, the record and the field, not a traceback.
    try:
        if args.command == "refer-rec":
            records = refer_to_rec(args.refs, args.instances, args.split, args.image_prefix, args.sentence_field)
        elif args.command == "refer-regions":
            records = refer_to_region_captions(args.refs, args.instances, args.split, args.image_prefix,
                                               args.sentence_field)
        else:
            records = coco_regions_to_region_captions(args.annotations, args.image_prefix)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_jsonl(args.out, records)
    except (RecordError, JSONFileError, OSError) as error:
        raise SystemExit(f"convert: error: {error}") from None
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
