"""A PNG of held-out cycles before and after SC-Tune: image, true box, caption and re-grounded box."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TRUE_COLOUR = (0, 160, 0)
PRED_COLOUR = (230, 0, 200)
SCALE = 2  # the 128 px images are upscaled so the text stays readable
CAPTION_HEIGHT = 34


def _panel(row: dict, title: str, font) -> Image.Image:
    with Image.open(row["image"]) as image:
        image = image.convert("RGB")
    width, height = image.size
    image = image.resize((width * SCALE, height * SCALE), Image.NEAREST)
    panel = Image.new("RGB", (image.width, image.height + CAPTION_HEIGHT), (255, 255, 255))
    panel.paste(image, (0, 0))
    draw = ImageDraw.Draw(panel)
    def to_px(box):  # sorted: a locator may write an inverted box, which still deserves a picture
        x1, x2 = sorted((box[0] * image.width, box[2] * image.width))
        y1, y2 = sorted((box[1] * image.height, box[3] * image.height))
        return [x1, y1, x2, y2]

    draw.rectangle(to_px(row["bbox"]), outline=TRUE_COLOUR, width=3)
    if row["pred"] is not None:
        draw.rectangle(to_px(row["pred"]), outline=PRED_COLOUR, width=2)
    verdict = "hit" if row["iou"] >= 0.5 else "miss"
    draw.text((4, image.height + 2), f"{title}: \"{row['caption']}\"", fill=(0, 0, 0), font=font)
    draw.text((4, image.height + 17), f"IoU {row['iou']:.2f} ({verdict})", fill=(0, 0, 0), font=font)
    return panel


def before_after_grid(before_rows: Sequence[dict], after_rows: Sequence[dict], path: str | Path,
                      columns: int = 4) -> str:
    """Pairs of panels (before | after) for the same objects, ``columns`` pairs per line.

    Green: the true box the describer was asked about; magenta: the box the locator found from the caption.
    """
    if len(before_rows) != len(after_rows):
        raise ValueError(f"{len(before_rows)} 'before' rows for {len(after_rows)} 'after' rows")
    font = ImageFont.load_default()
    pairs = []
    for before, after in zip(before_rows, after_rows):
        left, right = _panel(before, "before", font), _panel(after, "after", font)
        pair = Image.new("RGB", (left.width * 2 + 6, left.height), (255, 255, 255))
        pair.paste(left, (0, 0))
        pair.paste(right, (left.width + 6, 0))
        pairs.append(pair)
    if not pairs:
        raise ValueError("no cycles to draw")
    gap = 16
    rows = (len(pairs) + columns - 1) // columns
    pw, ph = pairs[0].size
    legend = 20
    grid = Image.new("RGB", (columns * pw + (columns - 1) * gap, legend + rows * ph + (rows - 1) * gap), (255, 255, 255))
    ImageDraw.Draw(grid).text((4, 4), "green: true box    magenta: box re-found from the caption    (left: before, "
                              "right: after SC-Tune)", fill=(0, 0, 0), font=font)
    for i, pair in enumerate(pairs):
        grid.paste(pair, ((i % columns) * (pw + gap), legend + (i // columns) * (ph + gap)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return str(path)
