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

import os
from collections.abc import Callable, Sequence

from PIL import Image

from sc_tune import checks
from sc_tune.data import AnnotationError, check_record, report_duplicates
from sc_tune.images import image_problem, load_rgb
from sc_tune.jsonio import read_records

RecordError = AnnotationError  # a bad input record; the message says which file, which record and which field


def _where(path, index: int) -> str:
    return f"{path}: record {index}"


def check_annotation_records(records: Sequence[dict], path="<records>") -> list[dict]:
    """Validate self-consistency records (the training format, checked by ``sc_tune.data``)."""
    clean = []
    for i, record in enumerate(records):
        item = check_record(record, i, path)
        if item.get("caption") is not None:
            checks.text(item, "caption", _where(path, i))
        clean.append(item)
    report_duplicates(str(path), clean)
    return clean


def check_rec_samples(samples: Sequence[dict], path="<samples>") -> list[dict]:
    """Validate Qwen-VL evaluate_grounding samples (pixel xyxy box, width, height)."""
    clean = []
    for i, sample in enumerate(samples):
        where = _where(path, i)
        size = {key: checks.positive_number(sample, key, where) for key in ("width", "height")}
        bbox = checks.xyxy_box(sample, "bbox", where)
        if max(bbox) <= 1.0 and max(size.values()) > 2:
            # Every coordinate within 1 pixel of the corner of a large image: a normalised box in a pixel file,
            # which would score IoU ~0 against any prediction (and is never a real referring target).
            raise RecordError(
                f"{where}: field 'bbox' {sample['bbox']!r} looks normalised (every coordinate <= 1 in a "
                f"{size['width']:g}x{size['height']:g} image), but REC boxes are pixels of the original image: "
                "multiply by width and height, or use the self-consistency format for normalised boxes"
            )
        clean.append({"image": checks.text(sample, "image", where), "sent": checks.text(sample, "sent", where),
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


def image_problems(records: Sequence[dict], image_root,
                   size_problem: Callable[[int, int], str | None] | None = None) -> dict[int, str]:
    """{record index: why its image cannot be used}, decoding every distinct file once, in parallel threads.
    ``size_problem``: the model family's check of the image size (``adapter.image_size_problem``, as training
    checks it), so an image its processor would refuse is found here, not mid-scoring."""
    from concurrent.futures import ThreadPoolExecutor

    root = os.fspath(image_root) if image_root else ""
    paths = sorted({r["image"] for r in records})
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        found = dict(zip(paths, pool.map(lambda p: image_problem(os.path.join(root, p), size_problem), paths)))
    return {i: found[r["image"]] for i, r in enumerate(records) if found[r["image"]] is not None}


def check_region_caption_records(records: Sequence[dict], path="<records>") -> list[dict]:
    """Validate region-caption records: a normalised box and one or more reference captions."""
    clean = []
    for i, record in enumerate(records):
        where = _where(path, i)
        refs = checks.reference_captions(record, where)
        clean.append({"image": checks.text(record, "image", where),
                      "bbox": checks.normalised_box(record, "bbox", where),
                      "captions": list(refs)})
    return clean


def _read_nonempty(path) -> list[dict]:
    records = read_records(path)
    if not records:
        raise RecordError(f"{path}: no records (an empty file would give metrics over nothing)")
    return records


def load_annotation_records(path) -> list[dict]:
    return check_annotation_records(_read_nonempty(path), path)


def load_rec_samples(path) -> list[dict]:
    return check_rec_samples(_read_nonempty(path), path)


def load_region_caption_records(path) -> list[dict]:
    return check_region_caption_records(_read_nonempty(path), path)


def open_image(image_root, relative_path: str, index: int) -> Image.Image:
    """The RGB image of sample ``index``, converted exactly as training converts it (:func:`sc_tune.images.load_rgb`:
    EXIF orientation, 16-bit grayscale, palettes, alpha); a missing or unreadable file names the sample."""
    path = os.path.join(os.fspath(image_root), relative_path) if image_root else relative_path
    try:
        return load_rgb(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"sample {index}: image file {path!r} not found "
                                f"(field 'image' = {relative_path!r}, image root {image_root!r})") from None
    except (OSError, ValueError) as e:
        raise RecordError(f"sample {index}: cannot read image {path!r}: {e}") from None
