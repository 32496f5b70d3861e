"""Reading and checking the three evaluation inputs. Every error names the file, the record and the field.

- annotation records (self-consistency): ``{"image": rel path, "bbox": [x1, y1, x2, y2] in [0, 1],
  optional "caption": str}``, the project's training format;
- REC samples, Qwen-VL's ``evaluate_grounding`` JSONL: ``{"image", "sent", "bbox": [x1, y1, x2, y2]
  in pixels of the original image, "width", "height"}``;
- region-caption records: an annotation record with ``"captions": [reference, ...]`` (or a single
  ``"caption"``).

Files may be a JSON list or JSON Lines (one object per line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from PIL import Image

from sc_tune.boxes import is_valid_box
from sc_tune.data import AnnotationError, check_record

RecordError = AnnotationError  # a bad input record; the message says which file, which record and which field


def _where(path, index: int) -> str:
    return f"{path}: record {index}"


def read_json_records(path) -> list[dict]:
    """A JSON list or a JSON Lines file -> list of dicts."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: not valid JSON ({e})") from None
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}: line {line_no} is not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise RecordError(f"{path}: expected a JSON list or JSON Lines of records, got {type(records).__name__}")
    if not records:
        raise RecordError(f"{path}: no records (an empty file would give metrics over nothing)")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise RecordError(f"{_where(path, i)}: expected a JSON object, got {type(record).__name__}")
    return records


def _field(record: dict, key: str, where: str):
    if key not in record:
        raise RecordError(f"{where}: missing field {key!r} (has {sorted(record)})")
    return record[key]


def _box(record: dict, key: str, where: str) -> list[float]:
    value = _field(record, key, where)
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise RecordError(f"{where}: field {key!r} must be four numbers [x1, y1, x2, y2], got {value!r}")
    box = [float(v) for v in value]
    if not is_valid_box(box):
        raise RecordError(f"{where}: field {key!r} is not a box with x1 <= x2 and y1 <= y2: {value!r}")
    return box


def _text(record: dict, key: str, where: str) -> str:
    value = _field(record, key, where)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _normalised_box(record: dict, where: str) -> list[float]:
    box = _box(record, "bbox", where)
    if not all(0.0 <= v <= 1.0 for v in box):
        raise RecordError(f"{where}: field 'bbox' must be normalised to [0, 1] (x1, y1, x2, y2), got {box}; "
                          "pixel boxes belong in the REC format")
    return box


def check_annotation_records(records: Sequence[dict], path="<records>") -> list[dict]:
    """Validate self-consistency records (the training format, checked by ``sc_tune.data``)."""
    clean = []
    for i, record in enumerate(records):
        item = check_record(record, i, path)
        if item.get("caption") is not None:
            _text(item, "caption", _where(path, i))
        clean.append(item)
    return clean


def check_rec_samples(samples: Sequence[dict], path="<samples>") -> list[dict]:
    """Validate Qwen-VL evaluate_grounding samples (pixel xyxy box, width, height)."""
    clean = []
    for i, sample in enumerate(samples):
        where = _where(path, i)
        size = {}
        for key in ("width", "height"):
            value = _field(sample, key, where)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise RecordError(f"{where}: field {key!r} must be a positive number, got {value!r}")
            size[key] = float(value)
        bbox = _box(sample, "bbox", where)
        clean.append({"image": _text(sample, "image", where), "sent": _text(sample, "sent", where),
                      "bbox": bbox, **size})
    return clean


def gt_box_issue(box: Sequence[float], width: float, height: float) -> str | None:
    """What is wrong with a ground-truth pixel box (it can still be scored, but is flagged and counted)."""
    x1, y1, x2, y2 = box
    if min(x1, y1) < 0:
        return "negative coordinates"
    if x2 > width or y2 > height:
        return "outside the image"
    if x2 <= x1 or y2 <= y1:
        return "zero area"
    return None


def image_problems(records: Sequence[dict], image_root) -> dict[int, str]:
    """{record index: why its image cannot be read}, decoding every distinct file once, in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    from sc_tune.data import image_problem

    root = os.fspath(image_root) if image_root else ""
    paths = sorted({r["image"] for r in records})
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        found = dict(zip(paths, pool.map(lambda p: image_problem(os.path.join(root, p)), paths)))
    return {i: found[r["image"]] for i, r in enumerate(records) if found[r["image"]] is not None}


def check_region_caption_records(records: Sequence[dict], path="<records>") -> list[dict]:
    """Validate region-caption records: a normalised box and one or more reference captions."""
    clean = []
    for i, record in enumerate(records):
        where = _where(path, i)
        if "captions" in record:
            refs = record["captions"]
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
                raise RecordError(f"{where}: field 'captions' must be a non-empty list of non-empty strings, "
                                  f"got {refs!r}")
        elif "caption" in record:
            refs = [_text(record, "caption", where)]
        else:
            raise RecordError(f"{where}: missing field 'captions' (a list of reference captions) or 'caption'")
        clean.append({"image": _text(record, "image", where), "bbox": _normalised_box(record, where),
                      "captions": list(refs)})
    return clean


def load_annotation_records(path) -> list[dict]:
    return check_annotation_records(read_json_records(path), path)


def load_rec_samples(path) -> list[dict]:
    return check_rec_samples(read_json_records(path), path)


def load_region_caption_records(path) -> list[dict]:
    return check_region_caption_records(read_json_records(path), path)


def open_image(image_root, relative_path: str, index: int) -> Image.Image:
    """The RGB image of sample ``index``; a missing or unreadable file names the sample."""
    path = os.path.join(os.fspath(image_root), relative_path) if image_root else relative_path
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"sample {index}: image file {path!r} not found "
                                f"(field 'image' = {relative_path!r}, image root {image_root!r})") from None
    except OSError as e:
        raise RecordError(f"sample {index}: cannot read image {path!r}: {e}") from None
