"""The cycle grid: boxes drawn where they belong, a parse failure drawn as such, one tile per cycle."""

import pytest
from PIL import Image

from sc_tune.visualize import FAIL_COLOR, PRED_COLOR, TRUE_COLOR, cycle_grid, save_cycle_grid


def test_grid_draws_true_and_predicted_boxes_and_parse_failures(tmp_path):
    gray = (128, 128, 128)
    images = [Image.new("RGB", (100, 100), gray), Image.new("RGB", (100, 100), gray)]
    true_boxes = [[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.8, 0.8]]
    pred_boxes = [[0.5, 0.5, 0.9, 0.9], None]
    grid = cycle_grid(images, true_boxes, ["the left square", "a thing"], pred_boxes, ious=[0.0, 0.0],
                      columns=2, tile_size=200)
    # Layout: pad 6, header 2 font lines (font 10 px -> line 14) + 8 = 36; tile 1 starts at x = 6,
    # tile 2 at 6 + 200 + 6 = 212. A 100-px image is scaled x2 to fill the 200-px tile.
    ox1, ox2, oy = 6, 212, 36
    assert grid.getpixel((ox1 + 60, oy + 20)) == TRUE_COLOR  # left edge x = .1*200 = 20 ... top edge y = 20
    assert grid.getpixel((ox1 + 20, oy + 60)) == TRUE_COLOR
    assert grid.getpixel((ox1 + 140, oy + 100)) == PRED_COLOR  # pred top edge y = .5*200 = 100
    assert grid.getpixel((ox1 + 120, oy + 120)) == gray  # inside the predicted box: untouched image
    assert grid.getpixel((ox2 + 150, oy + 3)) == FAIL_COLOR  # the "NO BOX" banner across the top
    assert grid.getpixel((ox2 + 100, oy + 100)) == FAIL_COLOR  # the cross through the middle
    path = save_cycle_grid(tmp_path / "sub" / "grid.png", images, true_boxes, ["a", "b"], pred_boxes)
    assert Image.open(path).size == cycle_grid(images, true_boxes, ["a", "b"], pred_boxes).size


def test_grid_rows_follow_columns_and_non_square_images_fit():
    images = [Image.new("RGB", (300, 100)), Image.new("RGB", (50, 200)), Image.new("RGB", (64, 64))]
    grid = cycle_grid(images, [[0, 0, 1, 1]] * 3, ["x"] * 3, [None, [0, 0, 1, 1], None], columns=2, tile_size=128)
    one_row = cycle_grid(images, [[0, 0, 1, 1]] * 3, ["x"] * 3, [None] * 3, columns=3, tile_size=128)
    assert grid.width == 2 * (128 + 6) + 6 and one_row.width == 3 * (128 + 6) + 6
    assert grid.height > one_row.height  # two rows of tiles instead of one


def test_grid_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 images, 1 true boxes, 2 captions, 2 predicted boxes"):
        cycle_grid([Image.new("RGB", (8, 8))] * 2, [[0, 0, 1, 1]], ["a", "b"], [None, None])
