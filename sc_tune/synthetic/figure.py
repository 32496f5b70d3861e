"""A PNG of held-out cycles before and after SC-Tune, drawn by the project's one cycle grid
(:func:`sc_tune.visualize.save_cycle_grid`): each object's *before* tile is followed by its *after* tile."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from sc_tune.visualize import save_cycle_grid


def before_after_grid(before_rows: Sequence[dict], after_rows: Sequence[dict], path: str | Path,
                      columns: int = 4) -> str:
    """``columns`` (before, after) pairs per line; rows hold ``image`` (a path), ``bbox``, ``caption``,
    ``pred`` (None on a parse failure) and ``iou``."""
    if len(before_rows) != len(after_rows):
        raise ValueError(f"{len(before_rows)} 'before' rows for {len(after_rows)} 'after' rows")
    rows = [(tag, row) for pair in zip(before_rows, after_rows) for tag, row in zip(("before", "after"), pair)]
    images = []
    for _, row in rows:
        with Image.open(row["image"]) as image:
            images.append(image.convert("RGB"))
    return save_cycle_grid(
        path, images, [r["bbox"] for _, r in rows], [f'{tag}: "{r["caption"]}"' for tag, r in rows],
        [r["pred"] for _, r in rows], [r["iou"] for _, r in rows], columns=2 * columns,
        title="held-out cycles: each object before SC-Tune, then after",
    )
