import pytest
import torch

from sc_tune.boxes import box_giou, box_iou, denormalize_box, normalize_box, xywh_to_xyxy


def iou(a, b):
    return box_iou(torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32)).item()


def test_identical_boxes_have_iou_one():
    assert iou([0.1, 0.2, 0.5, 0.6], [0.1, 0.2, 0.5, 0.6]) == pytest.approx(1.0)


def test_partial_overlap_matches_hand_computation():
    # A = [0,0,2,2] (area 4), B = [1,1,3,3] (area 4), intersection [1,1,2,2] = 1 -> 1 / (4 + 4 - 1)
    assert iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    # contained: [0,0,4,4] vs [1,1,2,2] -> 1 / 16
    assert iou([0, 0, 4, 4], [1, 1, 2, 2]) == pytest.approx(1 / 16)


def test_disjoint_and_touching_boxes_score_zero():
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert iou([0, 0, 1, 1], [1, 0, 2, 1]) == 0.0  # share an edge only


def test_degenerate_boxes_never_nan_or_negative():
    assert iou([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]) == 0.0  # two points: 0, not NaN
    # Inverted box (x2 < x1): zero area, not the negative area the reference used.
    assert iou([0.6, 0.6, 0.2, 0.2], [0.2, 0.2, 0.6, 0.6]) == 0.0
    assert iou([0.6, 0.6, 0.2, 0.2], [0.7, 0.7, 0.1, 0.1]) == 0.0


def test_giou_hand_computed():
    # [0,0,2,2] vs [1,1,3,3]: IoU 1/7; hull [0,0,3,3] = 9, union 7 -> GIoU = 1/7 - 2/9
    # [0,0,1,1] vs [2,0,3,1]: disjoint, hull 3 x 1 = 3, union 2 -> GIoU = 0 - 1/3
    pred = torch.tensor([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    target = torch.tensor([[1, 1, 3, 3], [2, 0, 3, 1], [0, 0, 1, 1]], dtype=torch.float32)
    assert box_giou(pred, target).tolist() == pytest.approx([1 / 7 - 2 / 9, -1 / 3, 1.0])
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert box_giou(point, point).tolist() == [0.0]  # no hull: 0, not NaN
    # Normalised boxes away from the origin (sides under 1, so no term can hide behind a zero corner or a unit side):
    # [0.1,0.2,0.5,0.6] vs [0.3,0.4,0.7,0.9]: areas 0.16 and 0.2, intersection 0.04, union 0.32, IoU 0.125; hull
    # 0.6 x 0.7 = 0.42 -> GIoU = 0.125 - 0.10 / 0.42. An inverted box has no area: its GIoU with the box it spans is 0.
    pred = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.6, 0.6, 0.2, 0.2]])
    target = torch.tensor([[0.3, 0.4, 0.7, 0.9], [0.2, 0.2, 0.6, 0.6]])
    assert box_giou(pred, target).tolist() == pytest.approx([0.125 - 0.10 / 0.42, 0.0], abs=1e-6)
    assert box_giou(target, pred).tolist() == pytest.approx([0.125 - 0.10 / 0.42, 0.0], abs=1e-6)


def test_conversions():
    assert xywh_to_xyxy([10, 20, 30, 40]) == [10, 20, 40, 60]
    assert normalize_box([10, 20, 40, 60], 100, 80) == pytest.approx([0.1, 0.25, 0.4, 0.75])
    assert normalize_box([-5, 0, 120, 80], 100, 80) == [0.0, 0.0, 1.0, 1.0]  # clamped to the image
    assert denormalize_box([0.1, 0.25, 0.4, 0.75], 100, 80) == pytest.approx([10, 20, 40, 60])
