"""Every training image checked before step 0: conversion rules, bad files, sizes, skipping with indices."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from sc_tune.data import AnnotationError, ReferringDataset, check_images, load_annotations, load_rgb


def _write_json(tmp_path, records, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    assert rgb.shape == (8, 8, 3)
    assert np.abs(rgb[..., 0].astype(float) - ramp / 257.0).max() <= 0.5 + 1e-6  # not 99.6 % white
    assert (rgb[..., 0] == 255).mean() < 0.05


def test_float_images_are_read_as_0_to_1(tmp_path):
    values = np.array([[-0.5, 0.0, 0.25, 0.5, 1.0, 1.5]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tiff")
    assert Image.open(tmp_path / "f.tiff").mode == "F"
    assert np.asarray(load_rgb(str(tmp_path / "f.tiff")))[0, :, 0].tolist() == [0, 0, 64, 128, 255, 255]


def test_the_check_gives_the_digest_of_a_good_image_only_and_only_when_asked(tmp_path):
    import hashlib

    from sc_tune.images import checked_image

    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "ok.png")
    path = str(tmp_path / "ok.png")
    assert checked_image(path) == (None, hashlib.sha256((tmp_path / "ok.png").read_bytes()).hexdigest())
    assert checked_image(path, digest=False) == (None, None)
    assert checked_image(path, lambda w, h: f"{w}x{h} is too small") == ("40x30 is too small", None)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    shown = load_rgb(str(tmp_path / "rot.jpg"))
    assert shown.size == (10, 20)  # portrait once the orientation is applied
    assert np.asarray(shown)[2, 5, 0] > 200  # the red half is now on top


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # fully transparent: the white background
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("LA", (100, 0), (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_modes_convert_to_rgb(tmp_path, mode, colour, expected):
    path = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (12, 12), colour).save(path)
    assert tuple(np.asarray(load_rgb(str(path)))[3, 3]) == pytest.approx(expected, abs=2)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (12, 12), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=0)
    assert tuple(np.asarray(load_rgb(str(tmp_path / "p.png")))[0, 0]) == (200, 10, 10)
    Image.new("P", (12, 12), 0).save(tmp_path / "t.png", transparency=0)
    assert tuple(np.asarray(load_rgb(str(tmp_path / "t.png")))[0, 0]) == (255, 255, 255)


def _bad_folder(tmp_path):
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "ok.png")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[:300])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"this is not an image")
    Image.new("RGB", (4000, 10)).save(tmp_path / "strip.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    names = ["ok.png", "truncated.jpg", "ok.png", "missing.png", "empty.png", "text.png", "strip.png", "tiny.png"]
    return _write_json(tmp_path, [{"image": n, "bbox": [0.1, 0.1, 0.5, 0.5]} for n in names])


def _size(width, height):
    from sc_tune.adapters.base import ModelAdapter

    return ModelAdapter.image_size_problem(ModelAdapter, width, height)


def test_the_size_check_draws_the_processors_bounds_exactly(tiny_checkpoint):
    # An aspect ratio of exactly 200 passes, as it passes Qwen2-VL's smart_resize (which refuses only > 200: the
    # processor itself, on the tiny Qwen2.5-VL, accepts the one and raises on the other); the shorter side, not the
    # longer, must be 8 pixels or more, either way round.
    from sc_tune.modeling import load_model_and_adapter

    assert _size(1600, 8) is None and _size(8, 1600) is None and _size(8, 8) is None
    assert _size(1608, 8) == "image aspect ratio too extreme (1608x8, > 200:1)"
    assert _size(100, 7) == _size(7, 100).replace("7x100", "100x7") == "image too small (100x7, shorter side < 8)"
    _, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_5_vl"))
    assert adapter.image_size_problem(1600, 8) is None
    assert adapter.prepare_image(Image.new("RGB", (1600, 8))).num_tokens > 0
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        adapter.prepare_image(Image.new("RGB", (1608, 8)))


def test_bad_images_stop_before_training_naming_file_and_record(tmp_path):
    path = _bad_folder(tmp_path)
    with pytest.raises(AnnotationError) as info:
        ReferringDataset.from_file(path, str(tmp_path), check=True, size_problem=_size)
    message = str(info.value)
    assert path in message and "6 record(s) with a bad field 'image'" in message
    assert "record 1: truncated.jpg: image cannot be decoded" in message
    assert "record 3: missing.png: image not found" in message


def test_skip_bad_records_counts_each_reason_with_original_indices(tmp_path, caplog):
    path = _bad_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        dataset = ReferringDataset.from_file(path, str(tmp_path), skip_bad=True, check=True, size_problem=_size)
    assert [r["record_index"] for r in dataset.records] == [0, 2]
    text = caplog.text
    assert "skipped 6 records for their image" in text
    for reason, index in [
        ("image not found: 1 (records 3)", 3),
        ("image file is empty: 1 (records 4)", 4),
        ("image aspect ratio too extreme", 6),
        ("image too small", 7),
    ]:
        assert reason in text, (reason, index)
    assert "image cannot be decoded: 2 (records 1, 5)" in text


def test_errors_after_skipping_name_the_original_record_index(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    path = _write_json(tmp_path, [{"image": "x", "bbox": [2, 0, 1, 1]}, {"image": "ok.png", "bbox": [0, 0, 1, 1]}])
    dataset = ReferringDataset.from_file(path, str(tmp_path), skip_bad=True)
    (tmp_path / "ok.png").write_bytes(b"broken later")
    with pytest.raises(OSError, match="record 1: field 'image'"):
        dataset[0]


def test_check_can_be_turned_off(tmp_path):
    path = _bad_folder(tmp_path)
    assert len(ReferringDataset.from_file(path, str(tmp_path), check=False)) == 8


def test_check_is_parallel_and_decodes_each_file_once(tmp_path, monkeypatch):
    import threading

    import sc_tune.images

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    records = load_annotations(_write_json(tmp_path, [{"image": "a.png", "bbox": [0, 0, 1, 1]}] * 50))
    seen = []
    original = sc_tune.images.load_rgb
    monkeypatch.setattr(sc_tune.images, "load_rgb", lambda p: seen.append(threading.get_ident()) or original(p))
    assert len(check_images(records, str(tmp_path), "ann.json", workers=4)) == 50
    assert len(seen) == 1  # 50 records, one distinct file


def test_non_utf8_annotation_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"image": "caf\u00e9.jpg", "bbox": [0, 0, 1, 1]}]'.encode("latin-1"))
    from sc_tune.jsonio import JSONFileError

    with pytest.raises(JSONFileError, match=r"latin1\.json: not UTF-8 text \(byte 15"):
        load_annotations(str(path))


def test_evaluation_opens_every_image_as_training_does(tmp_path):
    """Issue 19, 4: one file was two images (99.6 % white in evaluation, 0.2 % in training); now one opener."""
    from sc_tune.evaluation.records import open_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rotated = Image.new("RGB", (20, 10), (0, 0, 0))
    rotated.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    palette = Image.new("P", (12, 12), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=0)
    Image.new("RGBA", (12, 12), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    for name in ("g16.png", "rot.jpg", "p.png", "rgba.png"):
        training, evaluation = load_rgb(str(tmp_path / name)), open_image(tmp_path, name, 0)
        assert evaluation.mode == "RGB" and np.array_equal(np.asarray(training), np.asarray(evaluation)), name
    assert (np.asarray(open_image(tmp_path, "g16.png", 0)) == 255).mean() < 0.05  # not 99.6 % white
    assert open_image(tmp_path, "rot.jpg", 0).size == (10, 20)  # EXIF orientation applied


def test_there_is_one_image_opener():
    """No module but sc_tune/images.py opens an image file itself (Image.open)."""
    import os
    import re

    import sc_tune

    root = os.path.dirname(sc_tune.__file__)
    openers = [os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root)
               for name in names if name.endswith(".py")
               and re.search(r"Image\.open\(", open(os.path.join(folder, name)).read())]
    assert openers == ["images.py"], openers


def test_an_image_path_that_is_a_folder_is_named_as_one(tmp_path):
    from sc_tune.images import image_problem

    (tmp_path / "images").mkdir()
    assert image_problem(str(tmp_path / "images")) == "image path is a folder, not a file"
    assert image_problem(str(tmp_path / "gone.png")) == "image not found"


@pytest.mark.parametrize("orientation, turned", [(1, False), (2, False), (3, False), (4, False), (5, True), (6, True),
                                                 (7, True), (8, True)])
def test_displayed_size_is_the_loaded_images_size_from_the_header(tmp_path, orientation, turned):
    """LLaVA-1.5's count of boxes its center crop cuts away reads only the header: a phone photo stored sideways
    with an EXIF orientation of 5-8 is loaded turned (load_rgb's exif_transpose), its sides swapped."""
    from sc_tune.images import displayed_size, load_rgb

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / "photo.jpg")
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert displayed_size(path) == load_rgb(path).size == ((20, 40) if turned else (40, 20))
