"""Dirty real-world inputs: the Objects365 converter skips and counts them (or, --strict, stops)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from sc_tune.data import AnnotationError
from sc_tune.objects365 import convert, main


def _dirty_coco(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "good.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return {
        "images": [
            {"id": 1, "file_name": "good.jpg", "width": 100, "height": 100},
            {"id": 2, "file_name": "corrupt.jpg", "width": 100, "height": 100},
            {"id": 3, "file_name": "gone.jpg", "width": 100, "height": 100},
            {"id": "4", "file_name": "x.jpg", "width": 100, "height": 100},  # id of the wrong type
            {"id": 5, "file_name": "y.jpg", "width": 0, "height": 100},  # zero width
        ],
        "annotations": [
            {"image_id": 1, "bbox": [10, 10, 50, 50]},  # kept
            {"image_id": 99, "bbox": [10, 10, 50, 50]},  # unknown image_id
            {"image_id": 2, "bbox": [10, 10, 50, 50]},  # undecodable image
            {"image_id": 2, "bbox": [20, 20, 50, 50]},  # undecodable image
            {"image_id": 3, "bbox": [10, 10, 50, 50]},  # missing file
            {"image_id": 1, "bbox": [10, 10, 50]},  # malformed bbox
            {"image_id": 1},  # no bbox
            "not an object",
        ],
    }


def test_converter_skips_and_counts_dirty_records(tmp_path):
    records, counts = convert(_dirty_coco(tmp_path), "o365.json", image_folder=str(tmp_path))
    assert records == [{"image": "good.jpg", "bbox": [0.1, 0.1, 0.6, 0.6]}]
    assert counts["image_id not in 'images'"] == 1
    assert counts["image file undecodable"] == 2
    assert counts["image file missing"] == 1
    assert counts["malformed annotation"] == 3
    assert counts["malformed image entry"] == 2


@pytest.mark.parametrize(
    "images, annotations, message",
    [
        ([0, 3], [0], r"o365.json: images\[1\]: field 'id' must be int"),
        ([0, 4], [0], r"o365.json: images\[1\]: fields 'width'/'height' must be > 0"),
        ([0], [0, 1], r"annotations\[1\]: field 'image_id' 99 names no entry"),
        ([0], [0, 5], r"annotations\[1\]: field 'bbox' must be \[x, y, w, h\]"),
        ([0], [0, 6], r"annotations\[1\]: missing field 'bbox'"),
        ([0], [0, 7], r"annotations\[1\]: expected an object"),
        ([0, 2], [0, 4], r"annotations\[1\]: image file not found: gone.jpg"),
        ([0, 1], [0, 2], r"image corrupt.jpg \(id 2\): image cannot be decoded"),
    ],
)
def test_strict_makes_each_dirty_record_an_error(tmp_path, images, annotations, message):
    coco = _dirty_coco(tmp_path)
    coco = {
        "images": [coco["images"][i] for i in images],
        "annotations": [coco["annotations"][i] for i in annotations],
    }
    with pytest.raises(AnnotationError, match=message):
        convert(coco, "o365.json", image_folder=str(tmp_path), strict=True)
    records, counts = convert(coco, "o365.json", image_folder=str(tmp_path))
    assert len(records) == 1 and sum(v for k, v in counts.items() if "distinct" not in k) == 1


def test_converter_command_prints_the_counts(tmp_path, capsys):
    source = tmp_path / "o365.json"
    source.write_text(json.dumps(_dirty_coco(tmp_path)))
    out = tmp_path / "out.json"
    main(["--annotations", str(source), "--output", str(out), "--image_folder", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "wrote 1 records" in printed and "dropped: image_id not in 'images': 1" in printed
    assert "dropped: image file undecodable: 2" in printed
    assert len(json.loads(out.read_text())) == 1


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    from sc_tune.tiny import save_tiny

    root = tmp_path_factory.mktemp("eval_bad")
    Image.new("RGB", (80, 60), (40, 40, 200)).save(root / "blue.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root, save_tiny(root / "model", "qwen2_vl")


def _rec(root, rows, name="refs.jsonl"):
    path = root / name
    path.write_text("".join(json.dumps({"sent": "the thing", "width": 80, "height": 60, **r}) + "\n" for r in rows))
    return str(path)


def _evaluate(root, model, data, *extra):
    import evaluate

    out = tempfile.mkdtemp(dir=root, prefix="out")  # a fresh folder: a finished evaluation is never replaced
    evaluate.main(["rec", "--model", model, "--data", data, "--image-root", str(root), "--output-dir", str(out),
                   "--batch-size", "2", *extra])
    return json.loads((Path(out) / "rec_metrics.json").read_text())


def test_unreadable_eval_images_stop_before_scoring_listing_them(eval_setup, monkeypatch):
    import evaluate

    root, model = eval_setup
    data = _rec(root, [{"image": "blue.png", "bbox": [0, 0, 40, 30]}, {"image": "broken.png", "bbox": [0, 0, 4, 4]},
                       {"image": "gone.png", "bbox": [0, 0, 4, 4]}])
    monkeypatch.setattr(evaluate, "evaluate_rec", lambda *a, **k: pytest.fail("scoring started"))
    with pytest.raises(SystemExit, match=r"2 sample\(s\) with an unreadable image.*record 1: broken.png: image "
                                         r"cannot be decoded.*record 2: gone.png: image not found"):
        _evaluate(root, model, data)


def test_unreadable_eval_images_can_be_counted_and_rec_box_issues_are_counted(eval_setup):
    root, model = eval_setup
    data = _rec(root, [
        {"image": "blue.png", "bbox": [0, 0, 40, 30]},
        {"image": "broken.png", "bbox": [0, 0, 4, 4]},
        {"image": "blue.png", "bbox": [50, 40, 120, 59]},  # beyond the 80 px width
        {"image": "blue.png", "bbox": [-5, 0, 10, 10]},
        {"image": "blue.png", "bbox": [10, 10, 10, 20]},  # zero width
    ])
    result = _evaluate(root, model, data, "--skip-unreadable-images")
    metrics = result["results"]["refs"]
    assert metrics["num_records"] == 4
    assert metrics["gt_box_issues"] == {"negative coordinates": 1, "outside the image": 1, "zero area": 1}
    assert metrics["num_gt_box_issues"] == 3
    listed = result["unreadable_images"][data]
    assert listed["count"] == 1 and listed["samples"][0]["record"] == 1 and "decoded" in listed["samples"][0]["reason"]


@pytest.mark.parametrize("content", ["", "[]", "\n\n"])
def test_empty_eval_data_file_is_an_error(eval_setup, content):
    from sc_tune.evaluation.records import RecordError

    root, model = eval_setup
    path = root / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(RecordError, match="empty.jsonl: no records"):
        _evaluate(root, model, str(path))


def test_a_normalised_box_in_a_pixel_rec_file_is_flagged(tmp_path):
    """Issue 19, 9c: [0.1, 0.2, 0.5, 0.6] in an 640x480 REC record scored IoU ~0 silently."""
    from sc_tune.evaluation.records import RecordError, load_rec_samples

    path = tmp_path / "refs.jsonl"
    rows = [{"image": "a.jpg", "sent": "the cat", "bbox": [10, 20, 300, 400], "width": 640, "height": 480},
            {"image": "a.jpg", "sent": "the dog", "bbox": [0.1, 0.2, 0.5, 0.6], "width": 640, "height": 480}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"refs\.jsonl: record 1: field 'bbox' \[0\.1, 0\.2, 0\.5, 0\.6\] looks "
                                          r"normalised \(every coordinate <= 1 in a 640x480 image\)"):
        load_rec_samples(path)
    path.write_text(json.dumps(rows[0]) + "\n")
    assert load_rec_samples(path)[0]["bbox"] == [10.0, 20.0, 300.0, 400.0]


def test_the_normalised_box_check_judges_every_coordinate_and_only_large_images(tmp_path):
    """Flagged only where *every* coordinate is <= 1 (a box from the corner to the far edges starts at 0 too), up
    to exactly 1.0 (a whole-image normalised box), and only in an image larger than 2 pixels."""
    from sc_tune.evaluation.records import RecordError, check_rec_samples

    def sample(bbox, width=640, height=480):
        return {"image": "a.jpg", "sent": "the cat", "bbox": bbox, "width": width, "height": height}

    kept = [sample([0, 0, 640, 480]), sample([0, 0, 1.5, 1.5]), sample([0, 0, 1, 1], width=2, height=2)]
    assert [s["bbox"] for s in check_rec_samples(kept)] == [[0, 0, 640, 480], [0, 0, 1.5, 1.5], [0, 0, 1, 1]]
    with pytest.raises(RecordError, match=r"<samples>: record 1: field 'bbox' \[0, 0, 1\.0, 1\.0\] looks normalised"):
        check_rec_samples([sample([0, 0, 1.5, 1.5]), sample([0, 0, 1.0, 1.0])])


def test_a_ground_truth_box_may_reach_the_images_edges_but_not_pass_them():
    from sc_tune.evaluation.records import gt_box_issue

    assert gt_box_issue([0, 0, 80, 60], 80, 60) is None  # the whole image
    assert gt_box_issue([0, 0, 80.5, 60], 80, 60) == gt_box_issue([0, 0, 80, 60.5], 80, 60) == "outside the image"
    assert gt_box_issue([10, 10, 10, 20], 80, 60) == gt_box_issue([10, 10, 20, 10], 80, 60) == "zero area"
    assert gt_box_issue([10, 0, 20, 5], 80, 60) is None and gt_box_issue([0, -1, 20, 5], 80, 60) == "negative coordinates"
