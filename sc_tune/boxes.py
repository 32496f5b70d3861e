"""Boxes: the one home for IoU and for moving boxes between coordinate spaces.

Convention everywhere in this project: a box is ``[x1, y1, x2, y2]`` with coordinates normalised to
``[0, 1]`` by the image's width and height (x to the right, y down). Model-specific text formats
(integer grids, pixels of a resized image) live in the box codecs (:mod:`sc_tune.box_codecs`), which
convert to and from this convention and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The finest box grid of any family is 1/1000 of the image: a narrower box is written with x1 == x2 (no area), so
# training refuses it (``sc_tune.data.check_record``) and the Objects365 converter drops it.
MIN_BOX_SIDE = 1e-3


def box_iou(pred_N4: torch.Tensor, target_N4: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two aligned sets of xyxy boxes, shape ``(N, 4)`` each -> ``(N,)``.

    Inverted boxes (x2 < x1 or y2 < y1) have zero area instead of the negative area the reference code
    produced, so they can never inflate or flip the sign of an IoU. Two zero-area boxes score 0, not NaN.
    """
    pred_N4 = pred_N4.to(torch.float64)
    target_N4 = target_N4.to(torch.float64)
    wh_pred = (pred_N4[:, 2:] - pred_N4[:, :2]).clamp(min=0)
    wh_target = (target_N4[:, 2:] - target_N4[:, :2]).clamp(min=0)
    area_pred = wh_pred[:, 0] * wh_pred[:, 1]
    area_target = wh_target[:, 0] * wh_target[:, 1]
    top_left = torch.maximum(pred_N4[:, :2], target_N4[:, :2])
    bottom_right = torch.minimum(pred_N4[:, 2:], target_N4[:, 2:])
    wh_inter = (bottom_right - top_left).clamp(min=0)
    inter = wh_inter[:, 0] * wh_inter[:, 1]
    union = area_pred + area_target - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))
    return iou.to(torch.float32)


def box_giou(pred_N4: torch.Tensor, target_N4: torch.Tensor) -> torch.Tensor:
    """Element-wise generalised IoU (Rezatofighi et al., 2019), in ``[-1, 1]``: IoU minus the share of the
    smallest enclosing box that neither box covers. Unlike IoU it still ranks disjoint boxes by distance."""
    pred_N4 = pred_N4.to(torch.float64)
    target_N4 = target_N4.to(torch.float64)
    wh_pred = (pred_N4[:, 2:] - pred_N4[:, :2]).clamp(min=0)
    wh_target = (target_N4[:, 2:] - target_N4[:, :2]).clamp(min=0)
    wh_inter = (torch.minimum(pred_N4[:, 2:], target_N4[:, 2:]) - torch.maximum(pred_N4[:, :2], target_N4[:, :2]))
    inter = wh_inter.clamp(min=0).prod(dim=1)
    union = wh_pred.prod(dim=1) + wh_target.prod(dim=1) - inter
    wh_hull = (torch.maximum(pred_N4[:, 2:], target_N4[:, 2:]) - torch.minimum(pred_N4[:, :2], target_N4[:, :2]))
    hull = wh_hull.clamp(min=0).prod(dim=1)
    iou = box_iou(pred_N4, target_N4).to(torch.float64)
    # Two degenerate boxes have no hull area: GIoU falls back to their IoU (0), never NaN.
    uncovered = torch.where(hull > 0, (hull - union) / hull.clamp(min=1e-12), torch.zeros_like(hull))
    return (iou - uncovered).to(torch.float32)


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """COCO/Objects365 ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` in the same units."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def normalize_box(box_xyxy: Sequence[float], width: float, height: float) -> list[float]:
    """Pixels -> [0, 1], clamped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    clamp = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    return [clamp(x1 / width), clamp(y1 / height), clamp(x2 / width), clamp(y2 / height)]


def denormalize_box(box_norm: Sequence[float], width: float, height: float) -> list[float]:
    """[0, 1] -> pixels of an image of the given size."""
    x1, y1, x2, y2 = (float(v) for v in box_norm)
    return [x1 * width, y1 * height, x2 * width, y2 * height]
