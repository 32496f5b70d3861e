"""Pictures of describer -> locator cycles: a PNG grid of (image, true box, caption, re-grounded box).

One plain function serves the evaluator and training-time logging: give it PIL images, the true boxes,
the captions and the predicted boxes (normalised xyxy; ``None`` where the locator's text held no box,
which is drawn as a parse failure, never as an empty box) and it returns a PIL image.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

TRUE_COLOR = (0, 200, 0)
PRED_COLOR = (230, 30, 30)
FAIL_COLOR = (230, 30, 30)
TEXT_COLOR = (20, 20, 20)
BACKGROUND = (255, 255, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: a fixed-size bitmap font
        return ImageFont.load_default()


def _draw_box(draw: ImageDraw.ImageDraw, box_norm, offset, size, color, width: int) -> None:
    (ox, oy), (w, h) = offset, size
    x1, y1, x2, y2 = box_norm
    draw.rectangle([ox + x1 * w, oy + y1 * h, ox + max(x2, x1) * w, oy + max(y2, y1) * h], outline=color,
                   width=width)


def cycle_grid(images: Sequence[Image.Image], true_boxes: Sequence[Sequence[float]], captions: Sequence[str],
               pred_boxes: Sequence[Sequence[float] | None], ious: Sequence[float] | None = None,
               columns: int = 4, tile_size: int = 256, caption_lines: int = 4,
               title: str | None = None) -> Image.Image:
    """A grid with one tile per cycle: the image (fit into ``tile_size``), the true box in green, the
    re-grounded box in red (or a red "NO BOX" banner on a parse failure), and the caption and IoU below."""
    n = len(images)
    if not (len(true_boxes) == len(captions) == len(pred_boxes) == n) or (ious is not None and len(ious) != n):
        raise ValueError(f"cycle_grid needs one true box, caption and predicted box (and IoU) per image; got "
                         f"{n} images, {len(true_boxes)} true boxes, {len(captions)} captions, "
                         f"{len(pred_boxes)} predicted boxes" + (f", {len(ious)} IoUs" if ious is not None else ""))
    if n == 0:
        raise ValueError("cycle_grid needs at least one image")
    font_size = max(10, tile_size // 20)
    font = _font(font_size)
    line_height = font_size + 4
    chars_per_line = max(10, int(tile_size / (font_size * 0.55)))
    text_height = line_height * (caption_lines + 1) + 6
    header = line_height * 2 + 8
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    pad = 6
    tile_w, tile_h = tile_size + pad, tile_size + text_height + pad
    canvas = Image.new("RGB", (columns * tile_w + pad, header + rows * tile_h + pad), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    legend = "green: true box   red: box re-grounded from the caption"
    draw.text((pad, 4), title or "describer -> locator cycles", fill=TEXT_COLOR, font=font)
    draw.text((pad, 4 + line_height), legend, fill=TEXT_COLOR, font=font)
    line_width = max(2, tile_size // 128)
    for k in range(n):
        ox = pad + (k % columns) * tile_w
        oy = header + (k // columns) * tile_h
        image = images[k].convert("RGB")
        scale = tile_size / max(image.size)
        shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        canvas.paste(shown, (ox, oy))
        _draw_box(draw, true_boxes[k], (ox, oy), shown.size, TRUE_COLOR, line_width)
        if pred_boxes[k] is not None:
            _draw_box(draw, pred_boxes[k], (ox, oy), shown.size, PRED_COLOR, line_width)
            status = f"IoU {ious[k]:.3f}" if ious is not None else "re-grounded"
            status_color = TEXT_COLOR
        else:
            # A parse failure: a red banner across the image and a cross, so it cannot be mistaken for a box.
            draw.line([ox, oy, ox + shown.width, oy + shown.height], fill=FAIL_COLOR, width=line_width)
            draw.line([ox + shown.width, oy, ox, oy + shown.height], fill=FAIL_COLOR, width=line_width)
            draw.rectangle([ox, oy, ox + shown.width, oy + line_height + 2], fill=FAIL_COLOR)
            draw.text((ox + 3, oy + 1), "NO BOX (parse failure)", fill=BACKGROUND, font=font)
            status, status_color = "parse failure: IoU 0", FAIL_COLOR
        text_y = oy + tile_size + 3
        draw.text((ox, text_y), status, fill=status_color, font=font)
        wrapped = textwrap.wrap(captions[k].replace("\n", " ") or "(empty caption)", chars_per_line)
        if len(wrapped) > caption_lines:
            wrapped = wrapped[:caption_lines]
            wrapped[-1] = wrapped[-1][: max(0, chars_per_line - 3)] + "..."
        for j, line in enumerate(wrapped):
            draw.text((ox, text_y + line_height * (j + 1)), line, fill=TEXT_COLOR, font=font)
    return canvas


def save_cycle_grid(path, images, true_boxes, captions, pred_boxes, ious=None, **kwargs) -> str:
    """:func:`cycle_grid` written to ``path`` as PNG; returns the path."""
    grid = cycle_grid(images, true_boxes, captions, pred_boxes, ious, **kwargs)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    grid.save(path, format="PNG")
    return str(path)
