"""Field checks for input records: the one family of checkers behind every annotation, evaluation and
conversion input. Each takes the record, the field and ``where`` (``"<file>: record <i>"`` or the like) and
returns the clean value, or raises :class:`AnnotationError` naming the file, the record and the field."""

from __future__ import annotations

import math


class AnnotationError(ValueError):
    """A record of an input file is malformed; the message says which file, which record and which field."""


def need(record, key: str, where: str):
    """``record[key]``; the record must be a JSON object that has the field."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise AnnotationError(f"{where}: missing field {key!r} (has {sorted(record)})")
    return record[key]


def typed(record, key: str, kind, where: str):
    """``record[key]``, which must be of ``kind`` (a type or a tuple of types; ``bool`` never counts as a number)."""
    value = need(record, key, where)
    if not isinstance(value, kind) or isinstance(value, bool):
        name = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise AnnotationError(f"{where}: field {key!r} must be {name}, got {value!r}")
    return value


def text(record, key: str, where: str) -> str:
    """A non-empty string field."""
    value = need(record, key, where)
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def reference_captions(record, where: str) -> list[str]:
    """``record["captions"]`` (a non-empty list of non-empty strings) or ``[record["caption"]]``."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "captions" in record:
        captions = record["captions"]
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip()
                                                                     for c in captions):
            raise AnnotationError(f"{where}: field 'captions' must be a non-empty list of non-empty strings, "
                                  f"got {captions!r}")
        return list(captions)
    if "caption" in record:
        return [text(record, "caption", where)]
    raise AnnotationError(f"{where}: missing field 'caption' (or 'captions', a list of reference captions)")


def positive_number(record, key: str, where: str) -> float:
    value = need(record, key, where)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise AnnotationError(f"{where}: field {key!r} must be a positive number, got {value!r}")
    return float(value)


def four_numbers(value, key: str, where: str, layout: str = "four numbers [x1, y1, x2, y2]") -> list[float]:
    """A box field's value: four finite numbers (``layout`` says which four, for the message)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise AnnotationError(f"{where}: field {key!r} must be {layout}, got {value!r}")
    return [float(v) for v in value]


def xyxy_box(record, key: str, where: str) -> list[float]:
    """A corner box in any unit (e.g. pixels): x1 <= x2 and y1 <= y2."""
    box = four_numbers(need(record, key, where), key, where)
    if not (box[0] <= box[2] and box[1] <= box[3]):
        raise AnnotationError(f"{where}: field {key!r} is not a box with x1 <= x2 and y1 <= y2: {record[key]!r}")
    return box


def normalised_box(record, key: str, where: str) -> list[float]:
    """The project's box: normalised xyxy with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 (a box with area)."""
    box = four_numbers(need(record, key, where), key, where)
    x1, y1, x2, y2 = box
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise AnnotationError(
            f"{where}: field {key!r} must be normalised xyxy with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, "
            f"got {record[key]!r} (pixel boxes belong in the REC format; convert COCO/Objects365 xywh pixels "
            "with `python -m sc_tune.objects365`)"
        )
    return box
