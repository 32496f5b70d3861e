"""Converters (refer refs + instances -> REC JSONL / region captions; COCO-style -> region captions) and the
record checks: exact outputs, and errors that name the file, the record and the field."""

import json
import pickle
import re

import pytest

from sc_tune.evaluation.convert import (coco_regions_to_region_captions, main, refer_to_rec,
                                        refer_to_region_captions)
from sc_tune.evaluation.records import (RecordError, load_annotation_records, load_rec_samples,
                                        load_region_caption_records)
from sc_tune.jsonio import JSONFileError

INSTANCES = {
    "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 200, "height": 100},
               {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 400, "height": 300}],
    "annotations": [{"id": 10, "image_id": 1, "bbox": [20, 10, 50, 40], "category_id": 1},
                    {"id": 20, "image_id": 2, "bbox": [0, 0, 100, 150], "category_id": 1}],
}
REFS = [
    {"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val",
     "file_name": "COCO_train2014_000000000001_10.jpg",  # refer's per-ref name, not the image file
     "sentences": [{"sent": "left dog", "raw": "Left dog."}, {"sent": "the brown dog", "raw": "The brown dog"}]},
    {"ref_id": 1, "ann_id": 20, "image_id": 2, "split": "testA",
     "sentences": [{"sent": "man on the left", "raw": "Man on the left"}]},
]


@pytest.fixture()
def refer_files(tmp_path):
    refs, instances = tmp_path / "refs(unc).p", tmp_path / "instances.json"
    refs.write_bytes(pickle.dumps(REFS, protocol=2))
    instances.write_text(json.dumps(INSTANCES))
    return refs, instances


def test_refer_to_rec_one_line_per_sentence_in_pixels(refer_files):
    samples = refer_to_rec(*refer_files, split="val", image_prefix="train2014/")
    # xywh [20, 10, 50, 40] -> xyxy [20, 10, 70, 50], pixels of the 200 x 100 image.
    assert samples == [
        {"image": "train2014/COCO_train2014_000000000001.jpg", "sent": "left dog", "bbox": [20, 10, 70, 50],
         "width": 200, "height": 100},
        {"image": "train2014/COCO_train2014_000000000001.jpg", "sent": "the brown dog", "bbox": [20, 10, 70, 50],
         "width": 200, "height": 100},
    ]
    assert [s["sent"] for s in refer_to_rec(*refer_files, split="val", sentence_field="raw")] == \
        ["Left dog.", "The brown dog"]


def test_refer_to_region_captions_normalised(refer_files):
    records = refer_to_region_captions(*refer_files, split="testA")
    # [0, 0, 100, 150] on 400 x 300 -> [0, 0, 0.25, 0.5].
    assert records == [{"image": "COCO_train2014_000000000002.jpg", "bbox": [0.0, 0.0, 0.25, 0.5],
                        "captions": ["man on the left"]}]


def test_convert_cli_writes_jsonl_that_the_evaluator_loads(refer_files, tmp_path):
    out = tmp_path / "refcoco_val.jsonl"
    main(["refer-rec", "--refs", str(refer_files[0]), "--instances", str(refer_files[1]), "--split", "val",
          "--out", str(out)])
    assert len(load_rec_samples(out)) == 2


def test_refer_errors_name_file_record_and_field(tmp_path, refer_files):
    refs, instances = refer_files
    bad_refs = tmp_path / "bad.p"
    bad_refs.write_bytes(pickle.dumps([REFS[0], {**REFS[1], "split": "val", "ann_id": 99}]))
    with pytest.raises(RecordError, match=r"bad\.p: ref 1: field 'ann_id' = 99 is not in .*instances\.json"):
        refer_to_rec(bad_refs, instances, split="val")
    no_sentences = tmp_path / "nosent.p"
    no_sentences.write_bytes(pickle.dumps([{**REFS[0], "sentences": [{"raw": "x"}]}]))
    with pytest.raises(RecordError, match=r"nosent\.p: ref 0: sentences\[0\]: missing field 'sent'"):
        refer_to_rec(no_sentences, instances, split="val")
    bad_instances = tmp_path / "inst.json"
    bad_instances.write_text(json.dumps({**INSTANCES, "annotations": [{"id": 10, "image_id": 1, "bbox": [1, 2]}]}))
    with pytest.raises(RecordError, match=r"inst\.json: annotations\[0\]: field 'bbox' must be \[x, y, w, h\]"):
        refer_to_rec(refs, bad_instances, split="val")
    with pytest.raises(RecordError, match="no ref has split 'test'"):
        refer_to_rec(refs, instances, split="test")
    not_pickle = tmp_path / "refs.txt"
    not_pickle.write_text("hello")
    with pytest.raises(RecordError, match=r"refs\.txt: not a refer refs pickle"):
        refer_to_rec(not_pickle, instances, split="val")


def test_coco_regions_merge_captions_of_the_same_box(tmp_path):
    path = tmp_path / "regions_coco.json"
    path.write_text(json.dumps({
        "images": INSTANCES["images"],
        "annotations": [{"image_id": 1, "bbox": [20, 10, 50, 40], "caption": "a dog"},
                        {"image_id": 1, "bbox": [20, 10, 50, 40], "caption": "brown dog "},
                        {"image_id": 2, "bbox": [0, 0, 100, 150], "captions": ["a man"]}],
    }))
    # [20, 10, 50, 40] on 200 x 100 -> xyxy [20, 10, 70, 50] -> [0.1, 0.1, 0.35, 0.5].
    records = coco_regions_to_region_captions(path)
    assert records[0]["captions"] == ["a dog", "brown dog"]
    assert records[0]["bbox"] == pytest.approx([0.1, 0.1, 0.35, 0.5])
    assert records[1] == {"image": "COCO_train2014_000000000002.jpg", "bbox": [0.0, 0.0, 0.25, 0.5],
                          "captions": ["a man"]}
    path.write_text(json.dumps({"images": INSTANCES["images"], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(RecordError, match=r"regions_coco\.json: annotations\[0\]: missing field 'caption'"):
        coco_regions_to_region_captions(path)


def test_record_checks_name_file_record_and_field(tmp_path):
    rec = tmp_path / "rec.jsonl"
    rec.write_text(json.dumps({"image": "a.jpg", "sent": "x", "bbox": [0, 0, 5, 5], "width": 10, "height": 10})
                   + "\n" + json.dumps({"image": "a.jpg", "sent": "x", "bbox": [0, 0, 5, 5], "width": 10}) + "\n")
    with pytest.raises(RecordError, match=r"rec\.jsonl: record 1: missing field 'height'"):
        load_rec_samples(rec)
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps([{"image": "a.jpg", "bbox": [10, 10, 50, 50]}]))
    with pytest.raises(RecordError, match=r"held_out\.json: record 0: field 'bbox' must be normalised"):
        load_annotation_records(held_out)
    held_out.write_text(json.dumps([{"image_id": "a.jpg", "bbox": [0.1, 0.1, 0.5, 0.5], "caption": "a dog"}]))
    assert load_annotation_records(held_out) == [{"image": "a.jpg", "bbox": [0.1, 0.1, 0.5, 0.5], "caption": "a dog"}]
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps([{"image": "a.jpg", "bbox": [0.1, 0.1, 0.5, 0.5], "captions": []}]))
    with pytest.raises(RecordError, match=r"regions\.json: record 0: field 'captions' must be a non-empty list"):
        load_region_caption_records(regions)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "a.jpg"}\n{not json\n')
    with pytest.raises(JSONFileError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        load_rec_samples(broken)


def test_missing_image_names_the_sample(tmp_path):
    from sc_tune.evaluation.records import open_image

    with pytest.raises(FileNotFoundError, match=r"sample 3: image file .*missing\.png.* not found"):
        open_image(tmp_path, "missing.png", 3)


def test_coco_regions_cli_writes_jsonl_that_the_evaluator_loads(tmp_path):
    path, out = tmp_path / "regions_coco.json", tmp_path / "regions.jsonl"
    path.write_text(json.dumps({"images": INSTANCES["images"],
                                "annotations": [{"image_id": 2, "bbox": [0, 0, 100, 150], "caption": "a man"}]}))
    main(["coco-regions", "--annotations", str(path), "--image-prefix", "val/", "--out", str(out)])
    assert load_region_caption_records(out) == [{"image": "val/COCO_train2014_000000000002.jpg",
                                                 "bbox": [0.0, 0.0, 0.25, 0.5], "captions": ["a man"]}]


def _refer_argv(tmp_path, refs=REFS, instances=INSTANCES, refs_name="refs(unc).p"):
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return ["refer-rec", "--refs", str(tmp_path / refs_name), "--instances", str(tmp_path / "instances.json"),
            "--split", "val"]


def _coco_argv(tmp_path, content, name="regions_coco.json"):
    (tmp_path / "regions_coco.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return ["coco-regions", "--annotations", str(tmp_path / name)]


NO_CAPTION = {"images": INSTANCES["images"], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}


@pytest.mark.parametrize("argv, message", [
    (lambda t: _refer_argv(t, [{**REFS[0], "sentences": [{"raw": "x"}]}]),
     r"refs\(unc\)\.p: ref 0: sentences\[0\]: missing field 'sent' \(has \['raw'\]\)"),
    (lambda t: _refer_argv(t, [{**REFS[0], "ann_id": 99}]), r"refs\(unc\)\.p: ref 0: field 'ann_id' = 99 is not in "),
    (lambda t: _refer_argv(t, [{**REFS[0], "ann_id": [10]}]), r"ref 0: field 'ann_id' must be an id .*got \[10\]"),
    (lambda t: _refer_argv(t, refs_name="refs(umd).p"), r"refs\(umd\)\.p: no such file"),
    (lambda t: _refer_argv(t, instances={**INSTANCES, "images": 3}), r"instances\.json: field 'images' must be list"),
    (lambda t: _coco_argv(t, NO_CAPTION), r"regions_coco\.json: annotations\[0\]: missing field 'caption'"),
    (lambda t: _coco_argv(t, NO_CAPTION, "gone.json"), r"gone\.json: no such file"),
    (lambda t: _coco_argv(t, "{not json"), r"regions_coco\.json: not valid JSON"),
    (lambda t: _coco_argv(t, {**NO_CAPTION, "annotations": 5}), r"field 'annotations' must be list, got 5"),
    (lambda t: _coco_argv(t, {**NO_CAPTION, "annotations": []}), r"field 'annotations' is empty"),
    (lambda t: _coco_argv(t, {**NO_CAPTION, "annotations": [{"image_id": 1, "bbox": [20, 10, -5, 40], "caption": "a"}]}),
     r"regions_coco\.json: annotations\[0\]: field 'bbox' has a negative width or height: \[20, 10, -5, 40\]"),
    (lambda t: _refer_argv(t, instances={**INSTANCES, "annotations": [{**INSTANCES["annotations"][0],
                                                                      "bbox": [20, 10, 50, -1]}]}),
     r"instances\.json: annotations\[0\]: field 'bbox' has a negative width or height"),
    (lambda t: _refer_argv(t, [{**REFS[0], "sentences": []}]), r"ref 0: field 'sentences' must be a non-empty list"),
    (lambda t: _refer_argv(t, [{**REFS[0], "sentences": "left dog"}]),
     r"ref 0: field 'sentences' must be a non-empty list"),
    (lambda t: _refer_argv(t, [{**REFS[0], "sentences": [{"sent": "  "}]}]),
     r"ref 0: sentences\[0\]: field 'sent' must be a non-empty string"),
    (lambda t: _refer_argv(t, [{**REFS[0], "sentences": [{"sent": 5}]}]),
     r"ref 0: sentences\[0\]: field 'sent' must be a non-empty string"),
    *[(lambda t, size=size: _refer_argv(t, instances={**INSTANCES, "images": [{**INSTANCES["images"][0], **size}]}),
       r"instances\.json: images\[0\]: fields 'width' and 'height' must be positive numbers")
      for size in ({"width": "200"}, {"height": "100"}, {"width": 0}, {"height": 0})],
], ids=["no-sent", "unknown-ann_id", "list-ann_id", "no-refs-file", "images-not-list", "no-caption", "no-file",
        "not-json", "annotations-not-list", "no-annotations", "negative-width", "negative-height", "no-sentences",
        "sentences-not-list", "blank-sentence", "sentence-not-text", "width-text", "height-text", "width-0",
        "height-0"])
def test_convert_cli_bad_input_is_one_line_naming_the_file_not_a_traceback(tmp_path, argv, message):
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv(tmp_path), "--out", str(out)])
    error = exit_info.value.code  # a message: Python prints it to stderr and exits with status 1
    assert isinstance(error, str) and error.startswith("convert: error: ") and "\n" not in error, error
    assert re.search(message, error), error
    assert not out.exists()


def test_boxes_of_no_width_or_under_a_pixel_and_images_of_one_pixel_convert(tmp_path):
    """Only a negative width or height is refused: REC scores a box of zero width or height (and counts it as a
    ground-truth issue), and sub-pixel sizes are real."""
    refs, instances = tmp_path / "refs(unc).p", tmp_path / "instances.json"
    images = [*INSTANCES["images"], {"id": 3, "file_name": "one_pixel.jpg", "width": 1, "height": 1}]
    boxes = {10: (1, [20, 10, 0, 40]), 40: (1, [20, 10, 30, 0]), 20: (1, [20, 10, 0.5, 0.5]), 30: (3, [0, 0, 1, 1])}
    instances.write_text(json.dumps({"images": images, "annotations": [
        {"id": ann_id, "image_id": image_id, "bbox": bbox} for ann_id, (image_id, bbox) in boxes.items()]}))
    refs.write_bytes(pickle.dumps([{"ann_id": ann_id, "split": "val", "sentences": [{"sent": "it"}]}
                                   for ann_id in boxes], protocol=2))
    samples = refer_to_rec(refs, instances, split="val")
    assert [s["bbox"] for s in samples] == [[20, 10, 20, 50], [20, 10, 50, 10], [20, 10, 20.5, 10.5], [0, 0, 1, 1]]
    assert samples[3]["width"] == samples[3]["height"] == 1


@pytest.mark.parametrize("argv, missing", [
    ([], "command"),
    (["refer-rec", "--instances", "i.json", "--split", "val", "--out", "o.jsonl"], "--refs"),
    (["refer-regions", "--refs", "r.p", "--split", "val", "--out", "o.jsonl"], "--instances"),
    (["refer-rec", "--refs", "r.p", "--instances", "i.json", "--out", "o.jsonl"], "--split"),
    (["refer-rec", "--refs", "r.p", "--instances", "i.json", "--split", "val"], "--out"),
    (["coco-regions", "--out", "o.jsonl"], "--annotations"),
])
def test_convert_cli_names_a_missing_argument(argv, missing, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"error: the following arguments are required: {missing}" in capsys.readouterr().err


def test_convert_cli_help_and_usage_errors_show_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: python -m sc_tune.evaluation.convert [-h]")
    assert "Converters from the public annotation files to the evaluation formats." in printed
    with pytest.raises(SystemExit) as exit_info:
        main([*_coco_argv(tmp_path, NO_CAPTION), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "python -m sc_tune.evaluation.convert coco-regions: error: --out " in capsys.readouterr().err
