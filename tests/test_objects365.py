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
from tests.conftest import ROOT, script_module

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
    # and the counts: the annotations are converted once, in the second pass, whatever precedes them
    records, counts = objects365.convert_file(str(reordered), min_area=0.01, max_boxes_per_image=2, seed=3)
    assert (records, counts) == objects365.convert(coco, str(reordered), min_area=0.01, max_boxes_per_image=2, seed=3)
    assert "image_id not in 'images'" in counts  # the file's own dirt, counted once


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


def test_only_what_the_compact_columns_cannot_hold_is_kept_aside():
    """The memory claim (about 12 bytes a box): every box is integers of 1e-6 but -0.0, and every category an int32
    but the two marker values below the range, a bool, or an int past it; only those go into the per-box dicts."""
    converter = objects365._Converter("o365.json", None, 0.0, None, None, 0, objects365.DROP_FLAGS, False)
    converter.add_image(0, {"id": 1, "file_name": "a.jpg", "width": 3, "height": 7})
    categories = [5, -(2**31) + 2, 2**31 - 1, -(2**31) + 1, 2**31, True, "7"]
    for i, category in enumerate(categories):
        converter.add_annotation(i, {"image_id": 1, "bbox": [1, 1, 1, 3], "category_id": category})
    converter.add_annotation(7, {"image_id": 1, "bbox": [-0.0, 1, 2, 3]})
    assert list(converter.aside_boxes) == [7]
    assert converter.aside_categories == {3: -(2**31) + 1, 4: 2**31, 5: True, 6: "7"}
    assert list(converter.box_micro[:4]) == [333333, 142857, 666667, 571429]
    records, _ = converter.finish()
    assert [r.get("category_id", "absent") for r in records] == [*categories, "absent"]


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
    ('{"images": [], "annotations": []', r"not valid JSON \(expecting ',' or '}' at character 32\)"),  # cut off
    ("{}", r"missing field 'images' \(has \[\]\)"),
    ("{}x", r"not valid JSON \(Extra data at character 2\)"),
    ("12", r"expected a JSON object, got float"),
])
def test_malformed_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises((AnnotationError, JSONFileError), match=rf"{path}: .*{message}|{path}: {message}"):
        objects365.convert_file(str(path))
    path.write_bytes(b'{"images": [{"file_name": "caf\xe9.jpg"}]}')
    with pytest.raises(JSONFileError, match=rf"{path}: not UTF-8 text \(byte 30"):  # as read_json says
        objects365.convert_file(str(path))


@pytest.mark.parametrize("chunk", [3, 7, objects365.JsonStream.CHUNK])
def test_an_error_past_the_first_read_window_names_where_it_is_in_the_whole_file(tmp_path, monkeypatch, chunk):
    # Counted over the whole file, not the window that held it: the character json.load reports, the byte
    # read_json reports (1-byte characters before it, so the two agree).
    monkeypatch.setattr(objects365.JsonStream, "CHUNK", chunk)
    path = tmp_path / "bad.json"
    text = '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1,, "bbox": []}]}'
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    assert expected.value.pos > 2 * 7, "the test needs the error past the first windows"
    with pytest.raises(JSONFileError, match=rf"{path}: not valid JSON \(.* at character {expected.value.pos}\)$"):
        objects365.convert_file(str(path))
    path.write_bytes(b'{"images": [{"id": 1, "file_name": "caf\xe9.jpg"}], "annotations": []}')
    with pytest.raises(JSONFileError, match=rf"{path}: not UTF-8 text \(byte 39:"):
        objects365.convert_file(str(path))


def test_an_invalid_entry_is_reported_within_its_bound_without_reading_the_rest_of_the_file(tmp_path, monkeypatch):
    # A cut-off entry is read on (the next window may complete it), but only up to LARGEST_ENTRY characters past its
    # start: an invalid one in a 5 GB file is reported there, not after reading the rest of the file into memory;
    # valid entries (about 60 characters) cut by any window end are read whole.
    monkeypatch.setattr(objects365.JsonStream, "CHUNK", 128)
    monkeypatch.setattr(objects365.JsonStream, "LARGEST_ENTRY", 80)
    images = ", ".join(f'{{"id": {i}, "file_name": "{i}.jpg", "width": 640, "height": 480}}' for i in range(2000))
    for box, valid in (("[1, 2, 3, 4]", True), ("[1, 2, 3, 4}", False)):
        text = f'{{"annotations": [{{"image_id": 1, "bbox": {box}}}], "images": [{images}]}}'
        path = tmp_path / "file.json"
        path.write_text(text)
        stream = objects365.JsonStream(str(path))
        seen = {"annotations": [], "images": []}
        handlers = {key: (lambda index, element, key=key: seen[key].append(element)) for key in seen}
        if valid:
            stream.members(handlers)
            assert seen == json.loads(text)
            continue
        with pytest.raises(json.JSONDecodeError) as expected:
            json.loads(text)
        with pytest.raises(JSONFileError, match=rf"{path}: not valid JSON \(.* at character {expected.value.pos}\)$"):
            stream.members(handlers)
        assert stream._bytes <= expected.value.pos + 80 + 2 * 128 < len(text) // 100  # the bound, a window each side


def test_bench_script_reports_the_slope_and_the_extrapolation(tmp_path):
    result = subprocess.run([sys.executable, "scripts/bench_objects365.py", "--images", "200", "800", "--scenarios",
                             "readme", "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    runs = report["runs"]
    assert [r["images"] for r in runs] == [200, 800] and runs[1]["json_bytes"] > 3 * runs[0]["json_bytes"]
    assert all(r["peak_rss_bytes"] > 10**7 and 0 < r["cpu_seconds"] < 120 and 0 < r["seconds"] < 300 for r in runs)
    figures = report["scenarios"]["readme"]
    slope = (runs[1]["peak_rss_bytes"] - runs[0]["peak_rss_bytes"]) / (runs[1]["json_bytes"] - runs[0]["json_bytes"])
    assert figures["rss_bytes_per_json_byte"] == pytest.approx(slope, abs=1e-4)
    assert figures["extrapolated_peak_rss_bytes_5gb"] == pytest.approx(
        runs[1]["peak_rss_bytes"] + slope * (5e9 - runs[1]["json_bytes"]), rel=1e-6)


def _bench_module():
    return script_module("bench_objects365")


def test_bench_script_writes_the_committed_dirty_file(tmp_path):
    """tests/data/objects365/README.md: the goldens' source file is ``write_synthetic(path, 60, seed=5,
    boxes_per_image=6, dirt=True)``; the generator still writes it byte for byte (and says its size)."""
    written = tmp_path / "synthetic_dirty.json"
    size = _bench_module().write_synthetic(str(written), 60, seed=5, boxes_per_image=6, dirt=True)
    assert written.read_bytes() == open(SOURCE, "rb").read()
    assert size == os.path.getsize(SOURCE)


def test_bench_scripts_readme_scenario_is_the_readmes_command_at_the_real_size(tmp_path):
    """The memory figure docs/usage.md quotes is of the README's command: the ``readme`` scenario, scaled to the
    real file's 1.74 M images, passes exactly the README's (and docs/usage.md's) settings, and scales them down with
    the image count (at least 1 each)."""
    bench = _bench_module()

    def flags(command: str) -> dict:
        words = command.replace("\\\n", " ").split()
        return {w[2:]: words[i + 1] for i, w in enumerate(words) if w.startswith("--")}

    commands = []
    for doc in ("README.md", "docs/usage.md"):
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        found = re.search(r"python -m sc_tune\.objects365 (?:.*\\\n)*.*", text)
        assert found, doc
        commands.append(flags(found.group(0)))
    assert commands[0] == commands[1]
    readme = commands[0]
    argv = bench.scenario_argv("readme", int(bench.REAL_IMAGES), "o365.json", str(tmp_path))
    ours = {w[2:]: argv[i + 1] for i, w in enumerate(argv) if w.startswith("--")}
    for name in ("min_area", "max_boxes_per_image", "num_samples", "seed", "num_held_out"):
        assert float(ours[name]) == float(readme[name]), name
    small = bench.scenario_argv("readme", 10_000, "o365.json", str(tmp_path))  # 2,298.85 and 11.49, rounded
    assert small[small.index("--num_samples") + 1] == "2299" and small[small.index("--num_held_out") + 1] == "11"
    one = bench.scenario_argv("readme", 1, "o365.json", str(tmp_path))  # at least one of each
    assert one[one.index("--num_samples") + 1] == "1" and one[one.index("--num_held_out") + 1] == "1"
    tiny = bench.scenario_argv("all_boxes", 1, "o365.json", str(tmp_path))
    assert tiny[tiny.index("--num_samples") + 1] == "1" and "--num_held_out" not in tiny
    assert tiny[tiny.index("--min_area") + 1] == "0.0"


def test_bench_script_extrapolates_from_its_smallest_and_largest_sizes(tmp_path, monkeypatch, capsys):
    """Three sizes: the slope is taken between the smallest and the largest file, the memory extrapolated from the
    largest to 5 GB, the CPU time in proportion to the largest file's, and the verdict against 2 GB, exactly 2 GB
    within it (the converter stand-in here: 200 MB of base plus 0.3 bytes per byte of JSON, 2 CPU seconds per MB; a
    middle size that is off the line changes nothing)."""
    bench = _bench_module()
    sizes = {1000: 10_000_000, 2000: 20_000_000, 4000: 40_000_000}
    monkeypatch.setattr(bench, "write_synthetic", lambda path, num_images: sizes[num_images])  # no file: --keep
    runs = iter([(2e8 + 0.3 * 1e7, 20.0), (9e8, 40.0), (2e8 + 0.3 * 4e7, 80.0)])  # the middle one off the line
    monkeypatch.setattr(bench, "measure", lambda argv: dict(zip(("peak_rss_bytes", "cpu_seconds"), next(runs)),
                                                            seconds=1.0))
    bench.main(["--images", "4000", "1000", "2000", "--scenarios", "readme", "--workdir", str(tmp_path),
               "--keep"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["images"] for r in report["runs"]] == [1000, 2000, 4000]
    figures = report["scenarios"]["readme"]
    assert figures["rss_bytes_per_json_byte"] == pytest.approx(0.3)
    assert figures["extrapolated_peak_rss_bytes_5gb"] == pytest.approx(2e8 + 0.3 * 5e9, abs=1)  # 1.7 GB
    assert figures["extrapolated_cpu_seconds_5gb"] == 10_000  # 80 s per 40 MB
    assert figures["within_target"] is True and figures["target_bytes"] == 2 * 10**9
    runs = iter([(2e8 + 0.4 * 1e7, 20.0), (9e8, 40.0), (2e8 + 0.4 * 4e7, 80.0)])  # 2.2 GB at 5 GB: over
    bench.main(["--images", "1000", "2000", "4000", "--scenarios", "readme", "--workdir", str(tmp_path),
               "--keep"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scenarios"]["readme"]["within_target"] is False
    # Exactly 2 GB (binary-exact figures: files of 2^23 and 2^25 bytes, a slope of 0.25) is within the target.
    sizes.update({1000: 2**23, 4000: 2**25})
    runs = iter([(752_097_152, 20.0), (758_388_608, 80.0)])
    bench.main(["--images", "1000", "4000", "--scenarios", "readme", "--workdir", str(tmp_path),
               "--keep"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scenarios"]["readme"]
    assert figures["extrapolated_peak_rss_bytes_5gb"] == 2 * 10**9 and figures["within_target"] is True
    with pytest.raises(SystemExit):
        bench.main(["--images", "1000"])  # one size has no slope


def _one_image(*boxes, size=100) -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": size, "height": size}],
            "annotations": [{"image_id": 1, "bbox": list(box)} for box in boxes]}


def _run_main(tmp_path, capsys, coco, *argv) -> list[str]:
    source = tmp_path / "o365.json"
    source.write_text(json.dumps(coco))
    capsys.readouterr()
    objects365.main(["--annotations", str(source), "--output", str(tmp_path / "train.json"), *map(str, argv)])
    return capsys.readouterr().out.splitlines()


def test_a_box_wholly_outside_its_image_is_its_own_counted_skip_before_min_area_and_an_error_with_strict(
        tmp_path, capsys):
    coco = _one_image([10, 10, 50, 50], [150, 150, 40, 40], [100, 20, 5, 5])  # kept, beyond, touching the edge only
    for min_area in (0.0, 0.01):
        records, counts = objects365.convert(coco, "o365.json", min_area=min_area)
        assert records == [{"image": "a.jpg", "bbox": [0.1, 0.1, 0.6, 0.6]}]
        assert counts["outside the image"] == 2 and counts["smaller than min_area"] == 0, min_area
    with pytest.raises(AnnotationError, match=r"^o365\.json: annotations\[1\]: field 'bbox' \[150, 150, 40, 40\] "
                                              r"\(\[x, y, w, h\] in pixels\) lies wholly outside its image a\.jpg "
                                              r"\(100 x 100\)$"):
        objects365.convert(coco, "o365.json", min_area=0.01, strict=True)
    printed = _run_main(tmp_path, capsys, coco, "--min_area", "0.01")
    assert "  dropped: outside the image: 2" in printed and not any("min_area" in line for line in printed)


def test_a_box_partly_outside_is_clipped_kept_and_counted_as_a_note_not_a_drop(tmp_path, capsys):
    coco = _one_image([80, 80, 40, 40], [60, 60, 40, 40], [-0.5, 10, 20, 20])  # overruns; on the border; rounding
    records, counts = objects365.convert(coco, "o365.json", strict=True)
    assert [r["bbox"] for r in records] == [[0.8, 0.8, 1.0, 1.0], [0.6, 0.6, 1.0, 1.0], [0.0, 0.1, 0.195, 0.3]]
    assert counts == {objects365.CLIPPED: 2}
    printed = _run_main(tmp_path, capsys, coco)
    assert printed[1:] == ["  clipped to the image: 2"]  # after "wrote ...", and no "dropped:"


def test_the_summary_prints_notes_only_when_non_zero_after_the_drops(tmp_path, capsys):
    coco = _one_image([10, 10, 50, 50], [0, 0, 0, 5])
    printed = _run_main(tmp_path, capsys, coco)
    assert printed[1:] == ["  dropped: empty box: 1"]  # no "missing image files (distinct): 0"
    coco["images"].append({"id": 2, "file_name": "gone.jpg", "width": 10, "height": 10})
    coco["annotations"] += [{"image_id": 2, "bbox": [1, 1, 5, 5]}, {"image_id": 2, "bbox": [2, 2, 5, 5]}]
    Image.new("RGB", (100, 100)).save(tmp_path / "a.jpg")
    printed = _run_main(tmp_path, capsys, coco, "--image_folder", tmp_path)
    assert printed[1:] == ["  dropped: empty box: 1", "  dropped: image file missing: 2",
                           "  missing image files (distinct): 1"]


def test_the_held_out_error_counts_the_images_not_the_records(tmp_path, capsys):
    coco = _one_image([10, 10, 50, 50], [20, 20, 50, 50], [30, 30, 50, 50])
    coco["images"].append({"id": 2, "file_name": "b.jpg", "width": 100, "height": 100})
    coco["annotations"] += [{"image_id": 2, "bbox": [10, 10, 50, 50]}, {"image_id": 2, "bbox": [20, 20, 50, 50]}]
    with pytest.raises(objects365.ConversionError, match=r"--num_held_out 5 leaves no training record: 5 records of "
                                                         r"2 images after filtering"):
        _run_main(tmp_path, capsys, coco, "--held_out_output", tmp_path / "held.json", "--num_held_out", 5)
    assert not (tmp_path / "held.json").exists() and not (tmp_path / "train.json").exists()


def test_help_shows_the_command_and_the_example_keeps_its_line_breaks(capsys):
    with pytest.raises(SystemExit) as exit_info:
        objects365.main(["--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0 and shown.startswith("usage: python -m sc_tune.objects365 [-h]")
    assert "--image_folder /data/objects365 \\\n        --output data/object365.json" in shown


def test_a_sliver_the_trainer_would_refuse_is_a_counted_drop_not_a_written_record(tmp_path):
    """A box under 1/1000 of its image wide or high passes every converter filter at --min_area 0 (the default) but
    is refused by training (``data.check_record``): the converter must not write it (nor a held-out file with it,
    which evaluation could then not score)."""
    from sc_tune.data import check_record

    coco = {"images": [{"id": 1, "file_name": "wide.jpg", "width": 2000, "height": 1000}],
            "annotations": [{"image_id": 1, "bbox": [100, 100, 1, 600]}, {"image_id": 1, "bbox": [100, 100, 3, 600]}]}
    records, counts = objects365.convert(coco, "o365.json")
    assert [r["bbox"] for r in records] == [[0.05, 0.1, 0.0515, 0.7]]  # 3 px of 2000: 1.5 / 1000
    assert counts["sliver (under 1/1000 of the image wide or high)"] == 1
    check_record(records[0], 0, "train.json")  # what is written, training takes


def test_a_box_exactly_at_min_area_or_one_thousandth_wide_is_kept_and_training_takes_it(tmp_path):
    """The filters' bounds: ``min_area`` and the sliver bound (1/1000 of the image, as training's check) keep a box
    exactly at them and drop one just under."""
    from sc_tune.data import load_annotations
    from sc_tune.jsonio import write_json

    image = {"id": 1, "file_name": "a.jpg", "width": 1000, "height": 1000}
    square = {"images": [image], "annotations": [{"image_id": 1, "bbox": [0, 0, 500, 500]},
                                                  {"image_id": 1, "bbox": [0, 0, 500, 499]}]}
    records, counts = objects365.convert(square, min_area=0.25)
    assert [r["bbox"] for r in records] == [[0.0, 0.0, 0.5, 0.5]] and counts["smaller than min_area"] == 1
    thin = {"images": [image], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1000]},
                                                {"image_id": 1, "bbox": [0, 0, 1000, 0.999]},
                                                {"image_id": 1, "bbox": [500, 250, 0.999, 500]},
                                                {"image_id": 1, "bbox": [250, 500, 500, 0.999]}]}
    records, counts = objects365.convert(thin)
    assert [r["bbox"] for r in records] == [[0.0, 0.0, 0.001, 1.0]]
    assert counts["sliver (under 1/1000 of the image wide or high)"] == 3
    write_json(tmp_path / "thin.json", records)
    assert len(load_annotations(str(tmp_path / "thin.json"))) == 1


@pytest.mark.parametrize("value", ["1.5", "-0.1", "inf"])
def test_min_area_is_a_fraction_of_the_image(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        objects365.main(["--annotations", SOURCE, "--output", str(tmp_path / "train.json"), "--min_area", value])
    assert f"--min_area {value} must be a fraction" in capsys.readouterr().err
    assert not (tmp_path / "train.json").exists()


def test_each_edge_case_box_is_counted_under_its_own_reason():
    """A box on the image's edges is not clipped; one of no width is empty (not outside, not an error with
    --strict); one that starts on the far edge lies outside (clipped, nothing is left), not a sliver."""
    image = {"id": 1, "file_name": "a.jpg", "width": 1000, "height": 1000}
    coco = {"images": [image], "annotations": [
        {"image_id": 1, "bbox": [0, 0, 1000, 1000]},
        {"image_id": 1, "bbox": [10, 10, 0, 5]},
        {"image_id": 1, "bbox": [10, 10, 5, 0]},
        {"image_id": 1, "bbox": [1000, 0, 10, 10]},
        {"image_id": 1, "bbox": [0, 1000, 10, 10]},
        {"image_id": 1, "bbox": [10, -5, 10, 10]},  # above the top edge by 5 pixels: clipped
    ]}
    records, counts = objects365.convert(coco)
    assert [r["bbox"] for r in records] == [[0.0, 0.0, 1.0, 1.0], [0.01, 0.0, 0.02, 0.005]]
    assert counts == {"empty box": 2, "outside the image": 2, objects365.CLIPPED: 1}
    with pytest.raises(AnnotationError, match=r"annotations\[3\]: field 'bbox' \[1000, 0, 10, 10\] .* lies wholly "
                                              r"outside its image a.jpg \(1000 x 1000\)"):
        objects365.convert(coco, strict=True)


def test_a_sample_as_large_as_what_is_kept_changes_nothing():
    """``--num_samples`` equal to the records kept is no sampling: the records stay in their order, nothing counted."""
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in range(6)],
            "annotations": [{"image_id": i, "bbox": [1, 1, 5, 5 + i % 3]} for i in range(6)]}
    everything, counts = objects365.convert(coco, seed=1)
    assert objects365.convert(coco, num_samples=6, seed=1) == (everything, counts)
    assert "over num_samples" not in counts and len(everything) == 6


def test_an_image_entry_of_no_width_or_height_is_malformed():
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 10},
                       {"id": 2, "file_name": "b.jpg", "width": 10, "height": 0},
                       {"id": 3, "file_name": "c.jpg", "width": 1, "height": 1}],
            "annotations": [{"image_id": i, "bbox": [0, 0, 1, 1]} for i in (1, 2, 3)]}
    records, counts = objects365.convert(coco)
    assert [r["image"] for r in records] == ["c.jpg"]  # one pixel is an image
    assert counts == {"malformed image entry": 2, "image_id not in 'images'": 2}


def test_the_command_names_the_files_it_needs_and_min_area_may_be_the_whole_image(tmp_path, capsys):
    for argv, missing in (([], "--annotations, --output"), (["--annotations", SOURCE], "--output"),
                          (["--output", str(tmp_path / "o.json")], "--annotations")):
        with pytest.raises(SystemExit):
            objects365.main(argv)
        assert f"the following arguments are required: {missing}" in capsys.readouterr().err
    with pytest.raises((SystemExit, objects365.ConversionError)) as info:  # 1 is a fraction: nothing is that large
        objects365.main(["--annotations", SOURCE, "--output", str(tmp_path / "o.json"), "--min_area", "1"])
    assert "no record is left after filtering" in str(info.value) + capsys.readouterr().err
    # the reasons records were dropped, not the notes beside them (the distinct missing files)
    (tmp_path / "no_images").mkdir()
    with pytest.raises(objects365.ConversionError) as info:
        objects365.main(["--annotations", SOURCE, "--output", str(tmp_path / "o.json"), "--image_folder",
                         str(tmp_path / "no_images")])
    assert re.search(r"\(.*image file missing: \d+", str(info.value)) and objects365.MISSING_FILES not in str(info.value)


def test_image_ids_are_kept_across_the_whole_64_bit_range_and_refused_past_it():
    low, high = -(2**63), 2**63 - 1
    coco = {"images": [{"id": i, "file_name": f"{n}.jpg", "width": 10, "height": 10}
                       for n, i in enumerate((low, high, high + 1, low - 1))],
            "annotations": [{"image_id": i, "bbox": [1, 1, 5, 5]} for i in (low, high)]}
    records, counts = objects365.convert(coco)
    assert [r["image"] for r in records] == ["0.jpg", "1.jpg"] and counts == {"malformed image entry": 2}
    with pytest.raises(AnnotationError, match=rf"images\[2\]: field 'id' {high + 1} is out of the 64-bit range"):
        objects365.convert(coco, strict=True)


def test_the_unnamed_seed_is_0_and_the_held_out_file_holds_2000_records_by_default(tmp_path, capsys):
    """The defaults a command without ``--seed`` / ``--num_held_out`` gets (and the functions' ``seed``): the same
    bytes as ``--seed 0 --num_held_out 2000``, which the seed and count around them do not give."""
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(600)],
            "annotations": [{"image_id": i // 5, "bbox": [i % 5 * 10, 0, 9, 9]} for i in range(3000)]}
    source = tmp_path / "o365.json"
    source.write_text(json.dumps(coco))

    def written(*argv) -> tuple[bytes, bytes]:
        out = tmp_path / "_".join(argv or ("defaults",))
        out.mkdir()
        objects365.main(["--annotations", str(source), "--output", str(out / "train.json"), "--held_out_output",
                         str(out / "held.json"), "--num_samples", "2900", *argv])
        return (out / "train.json").read_bytes(), (out / "held.json").read_bytes()

    defaults = written()
    assert defaults == written("--seed", "0", "--num_held_out", "2000")
    assert len(json.loads(defaults[1])) == 2000
    for other in (("--seed", "1"), ("--num_held_out", "1995")):
        assert written(*other) != defaults, other
    capsys.readouterr()
    sampled = objects365.convert(coco, num_samples=2900)
    assert sampled == objects365.convert(coco, num_samples=2900, seed=0) != objects365.convert(coco, num_samples=2900,
                                                                                                 seed=1)
    assert objects365.convert_file(str(source), num_samples=2900) == sampled
    assert objects365.split_held_out(sampled[0], 100) == objects365.split_held_out(sampled[0], 100, seed=0) \
        != objects365.split_held_out(sampled[0], 100, seed=1)
