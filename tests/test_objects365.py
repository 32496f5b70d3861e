"""The streaming Objects365 converter (issue 19, items 5 and 11): the same bytes as the converter that read the whole
file, at any read window and key order; memory for the kept boxes only; images decoded only for kept records; no
output that overwrites an input; no empty result."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from sc_tune import objects365
from sc_tune.checks import AnnotationError
from sc_tune.jsonio import JSONFileError
from tests.conftest import ROOT

DATA = os.path.join(ROOT, "tests", "data", "objects365")
SOURCE = os.path.join(DATA, "synthetic_dirty.json")
CASES = {  # tests/data/objects365/README.md: the goldens were written with these arguments
    "readme": ["--min_area", "0.01", "--max_boxes_per_image", "2", "--num_samples", "60", "--seed", "3",
               "--held_out_output", "HELD", "--num_held_out", "10"],
    "defaults": [],
    "image_folder": ["--max_boxes_per_image", "1", "--seed", "7", "--image_folder", "FOLDER"],
    "sampled": ["--num_samples", "100", "--seed", "11", "--min_area", "0.002"],
}


def image_folder(tmp_path, source=SOURCE):
    """The images of the golden case: a file for every image whose id is not a multiple of 5."""
    folder = tmp_path / "images"
    for image in json.load(open(source))["images"]:
        if isinstance(image, dict) and isinstance(image.get("id"), int) and image["id"] % 5 != 0:
            path = folder / image["file_name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (image["id"] % 256, 0, 0)).save(path, format="JPEG")
    return folder


def convert_case(tmp_path, name, source=SOURCE, folder=None) -> tuple[dict[str, bytes], list[str]]:
    out = tmp_path / f"out_{name}"
    out.mkdir(exist_ok=True)
    argv = [a.replace("HELD", str(out / "held.json")).replace("FOLDER", str(folder or image_folder(tmp_path)))
            for a in CASES[name]]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        objects365.main(["--annotations", str(source), "--output", str(out / "train.json"), *argv])
    written = {p: (out / p).read_bytes() for p in ("train.json", "held.json") if (out / p).exists()}
    return written, printed.getvalue().replace(str(out), "OUT").replace("held.json", "readme_held.json").replace(
        "train.json", f"{name}.json").splitlines()


def golden(name) -> tuple[dict[str, bytes], list[str]]:
    files = {"train.json": open(os.path.join(DATA, f"golden_{name}.json"), "rb").read()}
    if os.path.exists(os.path.join(DATA, f"golden_{name}_held_out.json")):
        files["held.json"] = open(os.path.join(DATA, f"golden_{name}_held_out.json"), "rb").read()
    return files, json.load(open(os.path.join(DATA, "golden_printed.json")))[name]


@pytest.mark.parametrize("name", list(CASES))
def test_streaming_output_is_byte_identical_to_the_whole_file_converter(tmp_path, name):
    assert convert_case(tmp_path, name) == golden(name)


def test_identical_with_a_tiny_read_window_and_annotations_before_images(tmp_path, monkeypatch):
    """Every entry cut across reads (numbers too), and the key order that needs a second pass."""
    monkeypatch.setattr(objects365.JsonStream, "CHUNK", 7)
    assert convert_case(tmp_path, "readme") == golden("readme")
    coco = json.load(open(SOURCE))
    reordered = tmp_path / "annotations_first.json"
    reordered.write_text(json.dumps({"info": {"v": 2}, "annotations": coco["annotations"], "categories": [],
                                     "images": coco["images"]}, indent=1))
    monkeypatch.setattr(objects365.JsonStream, "CHUNK", 1 << 12)
    for name in CASES:
        assert convert_case(tmp_path, name, reordered)[0] == golden(name)[0], name


def test_numbers_cut_by_the_read_window_are_read_whole(tmp_path, monkeypatch):
    """A number at the end of the window may go on in the next read (``[12`` then ``34]``): read on first."""
    monkeypatch.setattr(objects365.JsonStream, "CHUNK", 3)
    path = tmp_path / "numbers.json"
    path.write_text('{"licenses": [1234567, 89], "images": 1234567890, "annotations": []}')
    with pytest.raises(AnnotationError, match=r"field 'images' must be list, got 1234567890$"):
        objects365.convert_file(str(path))
    stream = objects365.JsonStream(str(path))
    seen = []
    stream.members({"licenses": lambda i, v: seen.append(v), "images": lambda i, v: seen.append(v)})
    assert seen == [1234567, 89, 1234567890]


def test_the_file_is_never_read_whole(tmp_path, monkeypatch):
    def whole_file(*args, **kwargs):
        raise AssertionError("the converter read the whole file")

    monkeypatch.setattr(json, "load", whole_file)
    monkeypatch.setattr(json, "loads", whole_file)
    records, counts = objects365.convert_file(SOURCE, max_boxes_per_image=2, seed=3)
    assert len(records) > 50 and counts["malformed annotation"] > 0


def test_boxes_come_back_exactly_from_their_compact_form():
    """Kept boxes are stored as integers of 1e-6: m / 1e6 is round(v, 6) for every m a box can hold; -0.0 is kept
    aside (json writes it as -0.0)."""
    assert all(round(m / 1e6, 6) == m / 1e6 for m in range(0, 1_000_001))
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 3, "height": 7}],
            "annotations": [{"image_id": 1, "bbox": [-0.0, 1, 2, 3], "category_id": True},
                            {"image_id": 1, "bbox": [1, 1, 1, 3], "category_id": 2**40},
                            {"image_id": 1, "bbox": [0, 0, 1, 1]}]}
    records, _ = objects365.convert(coco)
    assert json.dumps(records) == json.dumps([
        {"image": "a.jpg", "bbox": [-0.0, round(1 / 7, 6), round(2 / 3, 6), round(4 / 7, 6)], "category_id": True},
        {"image": "a.jpg", "bbox": [round(1 / 3, 6), round(1 / 7, 6), round(2 / 3, 6), round(4 / 7, 6)],
         "category_id": 2**40},
        {"image": "a.jpg", "bbox": [0.0, 0.0, round(1 / 3, 6), round(1 / 7, 6)]}])


def test_only_the_kept_records_images_are_decoded_and_a_bad_one_is_dropped_and_counted(tmp_path, monkeypatch):
    folder = image_folder(tmp_path)
    decoded = []
    real = objects365.image_problem

    def spy(path):
        decoded.append(os.path.relpath(path, folder))
        return real(path)

    monkeypatch.setattr(objects365, "image_problem", spy)
    records, counts = objects365.convert_file(SOURCE, str(folder), max_boxes_per_image=1, num_samples=5, seed=7)
    assert sorted(decoded) == sorted({r["image"] for r in records}) and len(records) == 5
    victim = records[0]["image"]
    (folder / victim).write_bytes(b"not a jpeg")
    decoded.clear()
    again, counts = objects365.convert_file(SOURCE, str(folder), max_boxes_per_image=1, num_samples=5, seed=7)
    assert again == [r for r in records if r["image"] != victim]  # dropped, not replaced by another record
    assert counts["image file undecodable"] == sum(r["image"] == victim for r in records)
    clean = {"images": [{"id": 1, "file_name": victim, "width": 10, "height": 10}],
             "annotations": [{"image_id": 1, "bbox": [1, 1, 5, 5]}]}
    with pytest.raises(AnnotationError, match=rf"o365.json: image {victim} \(id 1\): image cannot be decoded"):
        objects365.convert(clean, "o365.json", str(folder), strict=True)


@pytest.mark.parametrize("width", [float("nan"), float("inf")])
def test_a_non_finite_image_size_is_a_malformed_entry_not_nan_boxes(width):
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": width, "height": 10},
                       {"id": 2, "file_name": "b.jpg", "width": 10, "height": 10}],
            "annotations": [{"image_id": 1, "bbox": [1, 1, 5, 5]}, {"image_id": 2, "bbox": [1, 1, 5, 5]}]}
    records, counts = objects365.convert(coco, "o365.json")
    assert records == [{"image": "b.jpg", "bbox": [0.1, 0.1, 0.6, 0.6]}]
    assert counts["malformed image entry"] == 1 and counts["image_id not in 'images'"] == 1
    assert all(math.isfinite(v) for r in records for v in r["bbox"])
    with pytest.raises(AnnotationError, match=r"o365.json: images\[0\]: fields 'width'/'height' must be finite"):
        objects365.convert(coco, "o365.json", strict=True)


def test_outputs_that_are_inputs_are_refused_before_anything_is_written(tmp_path, capsys):
    source = tmp_path / "o365.json"
    shutil.copy(SOURCE, source)
    before = source.read_bytes()
    train, held = tmp_path / "train.json", tmp_path / "held.json"
    for argv, message in [
        (["--output", str(source)], "--output .*o365.json is the same file as --annotations"),
        (["--output", str(train), "--held_out_output", str(train)], "--held_out_output .* is the same file as --output"),
        (["--output", str(train), "--held_out_output", str(tmp_path / "." / "o365.json")],
         "--held_out_output .* is the same file as --annotations"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            objects365.main(["--annotations", str(source), *argv])
        assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
        assert source.read_bytes() == before and not train.exists() and not held.exists()


@pytest.mark.parametrize("argv, message", [
    (["--num_held_out", "10000"], r"--num_held_out 10000 leaves no training record: \d+ records"),
    (["--min_area", "0.99"], r"no record is left after filtering \(.*smaller than min_area: \d+"),
    (["--num_held_out", "0"], r"--num_held_out 0 must be >= 1"),
    (["--num_samples", "0"], r"--num_samples 0 must be >= 1"),
    (["--min_area", "nan"], r"--min_area nan must be a fraction"),
])
def test_a_conversion_that_would_write_nothing_usable_is_an_error_and_writes_nothing(tmp_path, capsys, argv, message):
    train, held = tmp_path / "train.json", tmp_path / "held.json"
    with pytest.raises((SystemExit, objects365.ConversionError)) as info:
        objects365.main(["--annotations", SOURCE, "--output", str(train), "--held_out_output", str(held), *argv])
    assert re.search(message, str(info.value) + capsys.readouterr().err)
    assert not train.exists() and not held.exists()


def test_the_command_ends_in_a_message_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sc_tune.objects365", "--annotations", SOURCE, "--output",
                             str(tmp_path / "train.json"), "--held_out_output", str(tmp_path / "held.json"),
                             "--num_held_out", "10000"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("objects365: error: --num_held_out 10000 leaves no training record")


@pytest.mark.parametrize("content, message", [
    ('[{"images": []}]', r"expected a JSON object, got list"),
    ('{"annotations": []}', r"missing field 'images' \(has \['annotations'\]\)"),
    ('{"images": 3, "annotations": []}', r"field 'images' must be list, got 3"),
    ('{"images": [], "annotations": [}', r"not valid JSON"),
    ('{"images": [], "annotations": []} x', r"not valid JSON \(Extra data"),
])
def test_malformed_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises((AnnotationError, JSONFileError), match=rf"{path}: .*{message}|{path}: {message}"):
        objects365.convert_file(str(path))
    path.write_bytes(b'{"images": [{"file_name": "caf\xe9.jpg"}]}')
    with pytest.raises(JSONFileError, match=rf"{path}: not UTF-8 text \(byte 30"):  # as read_json says
        objects365.convert_file(str(path))


def test_bench_script_reports_the_slope_and_the_extrapolation(tmp_path):
    result = subprocess.run([sys.executable, "scripts/bench_objects365.py", "--images", "200", "800", "--scenarios",
                             "readme", "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    runs = report["runs"]
    assert [r["images"] for r in runs] == [200, 800] and runs[1]["json_bytes"] > 3 * runs[0]["json_bytes"]
    assert all(r["peak_rss_bytes"] > 10**7 and r["seconds"] > 0 for r in runs)
    figures = report["scenarios"]["readme"]
    slope = (runs[1]["peak_rss_bytes"] - runs[0]["peak_rss_bytes"]) / (runs[1]["json_bytes"] - runs[0]["json_bytes"])
    assert figures["rss_bytes_per_json_byte"] == pytest.approx(slope, abs=1e-4)
    assert figures["extrapolated_peak_rss_bytes_5gb"] == pytest.approx(
        runs[1]["peak_rss_bytes"] + slope * (5e9 - runs[1]["json_bytes"]), rel=1e-6)
