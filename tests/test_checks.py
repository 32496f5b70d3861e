"""sc_tune.checks: the one family of field checkers; each error names the place and the field."""

import pytest

from sc_tune import checks
from sc_tune.checks import AnnotationError

WHERE = "f.json: record 3"


@pytest.mark.parametrize("box", [[0.5, 0.1, 0.4, 0.2], [0.1, 0.1, 0.1, 0.2], [0.1, 0.2, 0.3, 0.2], [10, 10, 50, 50],
                                 [0, 0, 1.5, 0.5], [0, 0, 0.5, 1.5], [-0.1, 0, 0.5, 0.5], [0, -0.1, 0.5, 0.5],
                                 [0, 0, 1, float("nan")], [0, 0, True, 1], [0, 0, 1], "0 0 1 1"])
def test_normalised_box_refuses_what_is_not_a_box_with_area_in_the_unit_square(box):
    with pytest.raises(AnnotationError, match=r"f\.json: record 3: field 'bbox'"):
        checks.normalised_box({"bbox": box}, "bbox", WHERE)


def test_box_checks_accept_and_return_floats():
    assert checks.normalised_box({"bbox": [0, 0.25, 1, 0.5]}, "bbox", WHERE) == [0.0, 0.25, 1.0, 0.5]
    assert checks.normalised_box({"bbox": [0.25, 0, 0.5, 1]}, "bbox", WHERE) == [0.25, 0.0, 0.5, 1.0]
    assert checks.xyxy_box({"bbox": [10, 20, 300, 200]}, "bbox", WHERE) == [10.0, 20.0, 300.0, 200.0]  # pixels
    # Any unit, each corner pair ordered (a zero-width or zero-height pixel box is a box too).
    for box in ([300, 20, 310, 200], [10, 400, 300, 500], [10, 20, 10, 200], [10, 20, 300, 20]):
        assert checks.xyxy_box({"bbox": box}, "bbox", WHERE) == [float(v) for v in box]
    for box in ([300, 20, 10, 200], [10, 200, 300, 20]):
        with pytest.raises(AnnotationError, match="x1 <= x2"):
            checks.xyxy_box({"bbox": box}, "bbox", WHERE)
    with pytest.raises(AnnotationError, match=r"must be \[x, y, w, h\] in pixels"):
        checks.four_numbers([1, 2], "bbox", WHERE, layout="[x, y, w, h] in pixels")


def test_field_checks_name_the_field():
    with pytest.raises(AnnotationError, match=r"record 3: missing field 'sent' \(has \['image'\]\)"):
        checks.text({"image": "a.png"}, "sent", WHERE)
    with pytest.raises(AnnotationError, match="expected a JSON object, got list"):
        checks.need([1], "image", WHERE)
    assert checks.typed({"id": 3}, "id", int, WHERE) == 3
    with pytest.raises(AnnotationError, match="field 'id' must be int, got True"):
        checks.typed({"id": True}, "id", int, WHERE)  # a bool is not a number
    with pytest.raises(AnnotationError, match="field 'id' must be int or float, got '3'"):
        checks.typed({"id": "3"}, "id", (int, float), WHERE)
    assert checks.positive_number({"width": 0.5}, "width", WHERE) == 0.5
    for width in (0, -3, float("inf"), True, "640"):
        with pytest.raises(AnnotationError, match="field 'width' must be a positive number"):
            checks.positive_number({"width": width}, "width", WHERE)
    assert checks.text({"sent": " a dog "}, "sent", WHERE) == " a dog "
    for sent in ("", "  \n", 5, None):
        with pytest.raises(AnnotationError, match="field 'sent' must be a non-empty string"):
            checks.text({"sent": sent}, "sent", WHERE)


def test_reference_captions_take_a_list_or_one_caption():
    assert checks.reference_captions({"captions": ["a", "b"]}, WHERE) == ["a", "b"]
    assert checks.reference_captions({"caption": "a dog"}, WHERE) == ["a dog"]
    for captions in ([], ["a", "  "], ["a", 5], "a dog"):
        with pytest.raises(AnnotationError, match="'captions' must be a non-empty list"):
            checks.reference_captions({"captions": captions}, WHERE)
    with pytest.raises(AnnotationError, match="missing field 'caption'"):
        checks.reference_captions({"image": "a.png"}, WHERE)
