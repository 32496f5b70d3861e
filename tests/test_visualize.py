"""The cycle grid: boxes drawn where they belong, a parse failure drawn as such, one tile per cycle."""

import pytest
from PIL import Image, ImageDraw

from sc_tune.visualize import BACKGROUND, FAIL_COLOR, PRED_COLOR, TEXT_COLOR, TRUE_COLOR, cycle_grid, save_cycle_grid


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


def _recorded_text(monkeypatch) -> list:
    """Every ``draw.text`` call of the grids drawn after this: ``(xy, text, fill, font size)``, in order."""
    calls = []
    original = ImageDraw.ImageDraw.text

    def text(self, xy, content, fill=None, font=None, **kwargs):
        calls.append((tuple(xy), content, fill, getattr(font, "size", None)))
        return original(self, xy, content, fill=fill, font=font, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return calls


def test_grid_layout_and_text_at_the_default_size(monkeypatch):
    """Worked out by hand for the defaults (4 columns, 256-px tiles, 4 caption lines): font 256 // 20 = 12 px, lines
    16 px apart, int(256 / (12 * 0.55)) = 38 characters a line; the text under a tile is 16 * (4 + 1) + 6 = 86 px, the
    header 16 * 2 + 8 = 40 px, a tile 256 + 6 = 262 px wide and 256 + 86 + 6 = 348 px high, 6 px of padding."""
    calls = _recorded_text(monkeypatch)
    images = [Image.new("RGB", (64, 32))] * 5
    long_caption = " ".join(["word"] * 60)  # 299 characters: more than 4 lines of 38
    captions = [long_caption, "two\nlines", "", "exactly four lines " * 8, "a b"]
    grid = cycle_grid(images, [[0, 0, 1, 1]] * 5, captions, [[0, 0, 0.5, 0.5], None, [0, 0, 1, 1], None, None],
                      ious=[0.25, 0.0, 1.0, 0.0, 0.0])
    assert grid.size == (4 * 262 + 6, 40 + 2 * 348 + 6)  # 5 tiles in 4 columns: 2 rows
    assert calls[:2] == [((6, 4), "describer -> locator cycles", TEXT_COLOR, 12),
                         ((6, 20), "green: true box   red: box re-grounded from the caption", TEXT_COLOR, 12)]
    tiles = {}
    for xy, content, fill, size in calls[2:]:
        assert size == 12
        tiles.setdefault(xy[0], []).append((xy[1], content, fill))
    # Tile k at x = 6 + (k % 4) * 262, y = 40 + (k // 4) * 348; its status 259 px below, caption lines 16 px apart.
    first_lines = ["word " * 6 + "word"] * 3  # 34 characters: an eighth word would make 39, more than 38
    assert tiles[6][:5] == [(299, "IoU 0.250", TEXT_COLOR),
                            *[(299 + 16 * (j + 1), line, TEXT_COLOR) for j, line in enumerate(first_lines)],
                            (299 + 64, "word " * 6 + "word...", TEXT_COLOR)]  # the fourth of 9 lines: "..." added
    assert all(len(line) <= 38 for _, line, _ in tiles[6][:5])
    x2 = 6 + 262
    assert tiles[x2 + 3] == [(41, "NO BOX (parse failure)", BACKGROUND)]  # the banner over the image
    assert tiles[x2] == [(299, "parse failure: IoU 0", FAIL_COLOR), (315, "two lines", TEXT_COLOR)]
    assert tiles[6 + 2 * 262] == [(299, "IoU 1.000", TEXT_COLOR), (315, "(empty caption)", TEXT_COLOR)]
    four = [line for _, line, _ in tiles[6 + 3 * 262][1:]]
    assert len(four) == 4 and not four[-1].endswith("...")  # 151 characters: 4 lines, nothing cut
    # The fifth tile starts the second row, below the first.
    assert tiles[6][5:] == [(40 + 348 + 259, "parse failure: IoU 0", FAIL_COLOR), (40 + 348 + 275, "a b", TEXT_COLOR)]
    assert tiles[9] == [(40 + 348 + 1, "NO BOX (parse failure)", BACKGROUND)]


def test_grid_text_follows_the_tile_size_and_caption_lines(monkeypatch):
    calls = _recorded_text(monkeypatch)
    # 400-px tiles: font 20, lines 24 apart, int(400 / 11) = 36 characters; 2 caption lines: text 24 * 3 + 6 = 78 px.
    grid = cycle_grid([Image.new("RGB", (10, 10))], [[0, 0, 1, 1]], [("abcdefgh " * 20).strip()], [[0, 0, 1, 1]],
                      columns=3, tile_size=400, caption_lines=2, title="my run")
    assert grid.size == (400 + 6 + 6, 24 * 2 + 8 + 400 + 78 + 6 + 6)
    assert calls == [((6, 4), "my run", TEXT_COLOR, 20),
                     ((6, 28), "green: true box   red: box re-grounded from the caption", TEXT_COLOR, 20),
                     ((6, 56 + 403), "re-grounded", TEXT_COLOR, 20),
                     ((6, 56 + 403 + 24), "abcdefgh abcdefgh abcdefgh abcdefgh", TEXT_COLOR, 20),
                     ((6, 56 + 403 + 48), "abcdefgh abcdefgh abcdefgh abcdef...", TEXT_COLOR, 20)]  # 33 + 3
    # Small tiles keep a readable font and line width: at least 10 px and 10 characters a line.
    calls.clear()
    # 32-px tiles: 32 // 20 = 1 and int(32 / 5.5) = 5 are raised to 10; "x x x x x" (9) cut to 7 and "...".
    cycle_grid([Image.new("RGB", (10, 10))], [[0, 0, 1, 1]], ["x " * 30], [None], tile_size=32, caption_lines=1)
    assert {size for *_, size in calls} == {10}
    assert calls[-1][1] == "x x x x..."


def test_boxes_are_drawn_at_the_scaled_image_with_a_line_width_that_grows_with_the_tile():
    gray = (128, 128, 128)
    # A wide image: scaled by 512 / 200 to 512 x 256 in a 512-px tile; lines 512 // 128 = 4 px wide.
    grid = cycle_grid([Image.new("RGB", (200, 100), gray)], [[0.25, 0.5, 0.75, 1.0]], ["c"], [[0.5, 0.0, 1.0, 0.25]],
                      tile_size=512)
    ox, oy = 6, 29 * 2 + 8  # the header: font 512 // 20 = 25 px, lines 29 px apart
    # The true box's left edge at x = 0.25 * 512 = 128, from y = 0.5 * 256 = 128 down: 4 px wide, drawn inwards.
    assert [grid.getpixel((ox + x, oy + 200)) for x in range(126, 134)] == [gray] * 2 + [TRUE_COLOR] * 4 + [gray] * 2
    assert grid.getpixel((ox + 200, oy + 127)) == gray and grid.getpixel((ox + 200, oy + 128)) == TRUE_COLOR
    # The predicted box's bottom edge at y = 0.25 * 256 = 64 (the height scaled by the image's, not the tile's).
    assert [grid.getpixel((ox + 400, oy + y)) for y in range(59, 66)] == [gray] * 2 + [PRED_COLOR] * 4 + [gray]
    # Below the image (256 px high) and above the text: the tile's background, not the image.
    assert grid.getpixel((ox + 100, oy + 300)) == BACKGROUND


def test_a_parse_failure_crosses_the_scaled_image_only():
    gray = (128, 128, 128)
    # A tall image: 100 x 200 drawn 128 x 256; the cross runs corner to corner of the image, not of the tile.
    grid = cycle_grid([Image.new("RGB", (100, 200), gray)], [[0, 0, 0, 0]], ["c"], [None], tile_size=256)
    ox, oy = 6, 40
    assert grid.getpixel((ox + 64, oy + 128)) == FAIL_COLOR  # the middle of the image
    assert grid.getpixel((ox + 32, oy + 64)) == FAIL_COLOR and grid.getpixel((ox + 96, oy + 64)) == FAIL_COLOR
    assert grid.getpixel((ox + 64, oy + 64)) == gray
    assert grid.getpixel((ox + 200, oy + 128)) == BACKGROUND  # beside the image: nothing drawn
    # The banner: the image's width, one line high (16 + 2 px).
    assert grid.getpixel((ox + 127, oy + 17)) == FAIL_COLOR and grid.getpixel((ox + 129, oy + 5)) == BACKGROUND
    assert grid.getpixel((ox + 100, oy + 19)) == gray


def test_an_inverted_box_is_drawn_as_a_line_not_refused():
    # x2 < x1 (a locator's box read as written): drawn from x1 with no width instead of failing the picture.
    gray = (128, 128, 128)
    grid = cycle_grid([Image.new("RGB", (100, 100), gray)], [[0.5, 0.5, 0.25, 0.25]], ["c"], [[0, 0, 1, 1]],
                      tile_size=256, columns=1)
    ox, oy = 6, 40
    assert grid.getpixel((ox + 128, oy + 128)) == TRUE_COLOR
    assert grid.getpixel((ox + 100, oy + 100)) == gray  # nothing drawn back to (0.25, 0.25)


def test_an_empty_grid_and_mismatched_ious_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        cycle_grid([], [], [], [])
    with pytest.raises(ValueError, match="1 images, 1 true boxes, 1 captions, 1 predicted boxes, 2 IoUs"):
        cycle_grid([Image.new("RGB", (8, 8))], [[0, 0, 1, 1]], ["a"], [None], ious=[0.1, 0.2])
    # The folder is made, and an existing one is fine.
    path = tmp_path / "a" / "b" / "grid.png"
    for _ in range(2):
        assert save_cycle_grid(path, [Image.new("RGB", (8, 8))], [[0, 0, 1, 1]], ["a"], [None]) == str(path)
    assert Image.open(path).format == "PNG"


def test_a_sliver_of_an_image_is_still_shown_one_pixel_wide_and_lines_are_two_pixels_at_least():
    black = (0, 0, 0)
    # 1 x 1000 and 1000 x 1 scaled into 256-px tiles: round(0.256) = 0 pixels, shown as 1.
    grid = cycle_grid([Image.new("RGB", (1, 1000), black), Image.new("RGB", (1000, 1), black)], [[1, 1, 1, 1]] * 2,
                      ["a", "b"], [[1, 1, 1, 1]] * 2, tile_size=256, columns=2)
    ox, oy = 6, 40
    assert grid.getpixel((ox, oy + 128)) == black and grid.getpixel((ox + 1, oy + 128)) == BACKGROUND
    ox2 = ox + 262
    assert grid.getpixel((ox2 + 128, oy)) == black and grid.getpixel((ox2 + 128, oy + 1)) == BACKGROUND
    # Lines 2 px wide up to 383-px tiles (256 // 128 = 2), 3 px from 384.
    gray = (128, 128, 128)
    for tile_size, width in ((256, 2), (383, 2), (384, 3)):
        grid = cycle_grid([Image.new("RGB", (100, 100), gray)], [[0.5, 0.5, 1, 1]], ["c"], [[0, 0, 0, 0]],
                          tile_size=tile_size)
        header = (tile_size // 20 + 4) * 2 + 8
        x = 6 + tile_size // 2
        row = [grid.getpixel((x + i, header + tile_size * 3 // 4)) for i in range(-1, width + 1)]
        assert row == [gray] + [TRUE_COLOR] * width + [gray], tile_size
