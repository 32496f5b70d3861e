import json
import os

import pytest
from PIL import Image

from sc_tune.data import AnnotationError, ReferringDataset, RolloutSampler, collate_referring, load_annotations
from sc_tune.objects365 import convert
from sc_tune.phases import PhaseSchedule
from tests.conftest import SAMPLE_DATA, SAMPLE_IMAGES


def _write(tmp_path, records):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_bundled_sample_loads_and_collates():
    dataset = ReferringDataset.from_file(SAMPLE_DATA, SAMPLE_IMAGES)
    assert len(dataset) == 32
    batch = collate_referring([dataset[0], dataset[5]])
    assert batch["index"] == [0, 5] and batch["boxes"].shape == (2, 4)
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in batch["images"])


def test_reference_image_id_key_is_accepted(tmp_path):
    records = load_annotations(_write(tmp_path, [{"image_id": "a.jpg", "bbox": [0.1, 0.2, 0.3, 0.4]}]))
    assert records == [{"image": "a.jpg", "bbox": [0.1, 0.2, 0.3, 0.4], "record_index": 0}]


@pytest.mark.parametrize(
    "record, field",
    [
        ({"bbox": [0.1, 0.2, 0.3, 0.4]}, "'image'"),
        ({"image": "a.jpg", "bbox": [0.1, 0.2, 0.3]}, "'bbox'"),
        ({"image": "a.jpg", "bbox": [10, 20, 30, 40]}, "'bbox' must be normalised"),  # pixels, not [0,1]
        ({"image": "a.jpg", "bbox": [0.5, 0.2, 0.3, 0.4]}, "'bbox' must be normalised"),  # x1 > x2
        ({"image": "a.jpg", "bbox": [0.1, "0.2", 0.3, 0.4]}, "'bbox'"),
    ],
)
def test_bad_record_error_names_file_index_and_field(tmp_path, record, field):
    path = _write(tmp_path, [{"image": "ok.jpg", "bbox": [0, 0, 1, 1]}, record])
    with pytest.raises(AnnotationError) as info:
        load_annotations(path)
    assert path in str(info.value) and "record 1" in str(info.value) and field in str(info.value)


def test_skipping_counts_bad_records_and_missing_images(tmp_path, caplog):
    (tmp_path / "here.png").write_bytes(b"")
    path = _write(
        tmp_path,
        [
            {"image": "here.png", "bbox": [0, 0, 1, 1]},
            {"image": "gone.png", "bbox": [0, 0, 1, 1]},
            {"image": "here.png", "bbox": [2, 0, 1, 1]},
        ],
    )
    records = load_annotations(path, str(tmp_path), skip_bad=True)
    assert records == [{"image": "here.png", "bbox": [0.0, 0.0, 1.0, 1.0], "record_index": 0}]
    assert "skipped 2 of 3 records" in caplog.text


def test_unreadable_image_is_an_error_not_a_substitution(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    dataset = ReferringDataset.from_file(
        _write(tmp_path, [{"image": "broken.png", "bbox": [0, 0, 1, 1]}]), str(tmp_path)
    )
    with pytest.raises(OSError, match="record 0: field 'image'"):
        dataset[0]


def test_rollout_sampler_repeats_describer_batches_only():
    schedule = PhaseSchedule(describer_rollouts=1, locator_steps=2, ppo_epochs=2, describer_lr=1, locator_lr=1)
    stream = iter(RolloutSampler(num_samples=10, step_batch_size=3, schedule=schedule, seed=0))
    steps = [[next(stream) for _ in range(3)] for _ in range(6)]
    assert steps[1] == steps[0]  # describer rollout, epoch 1: same batch
    assert len({tuple(s) for s in steps[:4]}) == 3  # locator steps 2 and 3 draw new batches
    assert steps[5] == steps[4]  # next describer rollout
    again = iter(RolloutSampler(num_samples=10, step_batch_size=3, schedule=schedule, seed=0))
    assert [next(again) for _ in range(18)] == sum(steps, [])  # deterministic: resume replays it


@pytest.mark.parametrize("num_samples,step_batch_size", [(9, 3), (10, 3), (3, 3)])
def test_rollout_sampler_draws_every_sample_once_an_epoch(num_samples, step_batch_size):
    """Each epoch is a permutation cut into whole steps (a remainder under one step is not drawn that epoch; the
    next is a new permutation): a range that lost the epoch's last step, or began off the first sample, would skip
    or repeat data."""
    schedule = PhaseSchedule(describer_rollouts=0, locator_steps=1, ppo_epochs=1, describer_lr=1, locator_lr=1)
    stream = iter(RolloutSampler(num_samples=num_samples, step_batch_size=step_batch_size, schedule=schedule, seed=0))
    per_epoch = num_samples // step_batch_size
    for epoch in range(3):
        drawn = [next(stream) for _ in range(per_epoch * step_batch_size)]
        assert len(set(drawn)) == len(drawn) == per_epoch * step_batch_size, (epoch, drawn)
        assert set(drawn) <= set(range(num_samples))
    with pytest.raises(ValueError, match="2 samples cannot fill one step of 3"):
        next(iter(RolloutSampler(num_samples=2, step_batch_size=3, schedule=schedule, seed=0)))


def test_objects365_converter_filters_and_counts(tmp_path):
    from PIL import Image

    Image.new("RGB", (200, 100)).save(tmp_path / "a.jpg")
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
            {"id": 2, "file_name": "missing.jpg", "width": 100, "height": 100},
        ],
        "annotations": [
            {"image_id": 1, "bbox": [20, 10, 100, 50], "category_id": 3},  # kept: [0.1, 0.1, 0.6, 0.6]
            {"image_id": 1, "bbox": [0, 0, 2, 2]},  # area 4/20000 < min_area
            {"image_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1},
            {"image_id": 1, "bbox": [0, 0, 50, 50], "isfake": 1},
            {"image_id": 2, "bbox": [0, 0, 50, 50]},  # image file missing
        ],
    }
    records, counts = convert(coco, "o365.json", image_folder=str(tmp_path), min_area=0.01)
    assert records == [{"image": "a.jpg", "bbox": [0.1, 0.1, 0.6, 0.6], "category_id": 3}]
    assert counts["smaller than min_area"] == 1 and counts["image file missing"] == 1
    assert counts["flagged (iscrowd)"] == 1 and counts["flagged (isfake)"] == 1
    bad = {"images": coco["images"], "annotations": [{"image_id": 1, "bbox": [1, 2, 3]}]}
    with pytest.raises(AnnotationError, match=r"o365.json: annotations\[0\]: field 'bbox'"):
        convert(bad, "o365.json", strict=True)


def test_objects365_sampling_is_deterministic():
    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in range(20)],
        "annotations": [{"image_id": i, "bbox": [1, 1, 5, 5]} for i in range(20) for _ in range(3)],
    }
    first, counts = convert(coco, max_boxes_per_image=2, num_samples=7, seed=3)
    second, _ = convert(coco, max_boxes_per_image=2, num_samples=7, seed=3)
    assert first == second and len(first) == 7
    assert counts["over max_boxes_per_image"] == 20 and counts["over num_samples"] == 33


def test_objects365_held_out_split_shares_no_image_with_training(tmp_path):
    from sc_tune.jsonio import read_json, write_json
    from sc_tune.objects365 import main

    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in range(30)],
        "annotations": [{"image_id": i, "bbox": [1, 1, 5, 5 + j]} for i in range(30) for j in range(3)],
    }
    write_json(tmp_path / "o365.json", coco)
    main(["--annotations", str(tmp_path / "o365.json"), "--output", str(tmp_path / "train.json"),
          "--held_out_output", str(tmp_path / "held_out.json"), "--num_held_out", "10"])
    train, held_out = read_json(tmp_path / "train.json"), read_json(tmp_path / "held_out.json")
    assert len(held_out) == 12  # whole images of 3 boxes each until >= 10 records
    assert len(train) == 90 - 12
    assert not {r["image"] for r in train} & {r["image"] for r in held_out}
    # the training format, as evaluate.py reads it (the loader adds each record's index in the file)
    loaded = load_annotations(str(tmp_path / "held_out.json"))
    assert [{k: v for k, v in r.items() if k != "record_index"} for r in loaded] == held_out


def test_a_sliver_box_is_refused_or_skipped_and_counted(tmp_path, caplog):
    """Issue 19, 9b: a box under 1/1000 of the image trained silently (no box grid can write it with an area)."""
    import logging

    from sc_tune.boxes import MIN_BOX_SIDE

    path = tmp_path / "ann.json"
    path.write_text(json.dumps([{"image": "a.png", "bbox": [0.5, 0.1, 0.5 + MIN_BOX_SIDE / 2, 0.9]},
                                {"image": "a.png", "bbox": [0.1, 0.1, 0.9, 0.1004]},
                                {"image": "a.png", "bbox": [0.1, 0.1, 0.1 + MIN_BOX_SIDE, 0.2]}]))
    with pytest.raises(AnnotationError, match=r"ann\.json: record 0: field 'bbox' is a sliver \(under 1/1000"):
        load_annotations(str(path))
    with caplog.at_level(logging.WARNING):
        kept = load_annotations(str(path), skip_bad=True)
    assert [r["record_index"] for r in kept] == [2]
    assert "skipped 2 of 3 records: field 'bbox' is a sliver" in caplog.text and "(records 0, 1)" in caplog.text


def test_data_too_small_for_one_step_is_refused_naming_file_count_and_arithmetic():
    from sc_tune.data import check_fills_a_step

    check_fills_a_step(12, "ann.json", per_device_batch=2, grad_accum=3, world_size=2)  # exactly one step: fine
    with pytest.raises(AnnotationError) as refused:
        check_fills_a_step(11, "ann.json", per_device_batch=2, grad_accum=3, world_size=2, skipped="bad records")
    assert str(refused.value).startswith(
        "ann.json: 11 usable record(s) (after skipping bad records) cannot fill one training step of 12 records "
        "(--per_device_train_batch_size 2 x --gradient_accumulation_steps 3 x 2 process(es))"
    )


def test_repeated_records_are_kept_but_named(tmp_path, caplog):
    """A record repeating an earlier one's image and box weighs twice in training (and counts twice in an
    evaluation's metrics): kept, since the weighting may be meant, but never silently."""
    import logging

    from sc_tune.evaluation.records import check_annotation_records

    rows = [{"image": "a.jpg", "bbox": [0.1, 0.2, 0.3, 0.4]}, {"image": "b.jpg", "bbox": [0.1, 0.2, 0.3, 0.4]},
            {"image": "a.jpg", "bbox": [0.1, 0.2, 0.3, 0.4], "caption": "again"}, {"image": "a.jpg", "bbox": [0.1]},
            {"image": "b.jpg", "bbox": [0.1, 0.2, 0.3, 0.4]}]
    path = _write(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        kept = load_annotations(path, skip_bad=True)
    assert [r["record_index"] for r in kept] == [0, 1, 2, 4]
    assert "2 record(s) repeat an earlier record's image and box" in caplog.text
    assert "records 2 (= 0), 4 (= 1); kept as given" in caplog.text  # indices in the file, past the skipped one
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_annotation_records([rows[0], rows[1]], "held_out.json")
    assert "repeat" not in caplog.text
    with caplog.at_level(logging.WARNING):
        check_annotation_records([rows[0], rows[2]], "held_out.json")
    assert "held_out.json: 1 record(s) repeat" in caplog.text


def test_processes_holding_different_records_are_refused_naming_them(monkeypatch):
    """Each node reads the annotation file and checks its images itself: a node that skipped an image missing from
    its own disk (--skip_bad_records) held 51 records where rank 0 held 54, and the sampler's indices named other
    records there, silently. The ranks compare a digest of their records before training."""
    import torch.distributed as dist

    from sc_tune.data import check_same_records_on_every_rank

    dataset = ReferringDataset.from_file(SAMPLE_DATA, SAMPLE_IMAGES)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def gathered_with(rank1_view):  # all_gather_object as rank 0 sees it: its own view, then rank 1's
        return lambda out, mine: out.__setitem__(slice(None), [mine, rank1_view])

    def view_on_node_b(records):  # what rank 1, on node-b, contributes for its records
        seen = []

        def alone(out, mine):
            seen.append(mine)
            out[:] = [mine, mine]

        monkeypatch.setattr(dist, "all_gather_object", alone)
        check_same_records_on_every_rank(ReferringDataset(records, SAMPLE_IMAGES, SAMPLE_DATA))
        return ("node-b", *seen[0][1:])

    same, fewer = view_on_node_b(dataset.records), view_on_node_b(dataset.records[3:])
    monkeypatch.setattr(dist, "all_gather_object", gathered_with(same))
    check_same_records_on_every_rank(dataset)  # the same records on another node: fine
    monkeypatch.setattr(dist, "all_gather_object", gathered_with(fewer))
    with pytest.raises(AnnotationError, match=rf"{SAMPLE_DATA}: the processes hold different training records "
                                              rf"\(rank 0 on .*: {len(dataset)}; rank 1 on node-b: {len(dataset) - 3} "
                                              "records"):
        check_same_records_on_every_rank(dataset)
    moved = [dict(r) for r in dataset.records]
    moved[0]["bbox"] = [0.0, 0.0, 0.5, 0.5]  # as many records, one box not the same
    monkeypatch.setattr(dist, "all_gather_object", gathered_with(view_on_node_b(moved)))
    with pytest.raises(AnnotationError, match="different training records"):
        check_same_records_on_every_rank(dataset)

    # The same records, one image file with other bytes on node-b (a re-encoded copy): checked images carry digests.
    checked = ReferringDataset.from_file(SAMPLE_DATA, SAMPLE_IMAGES, check=True)
    other = [dict(r) for r in checked.records]
    other[0]["image_sha256"] = "0" * 64
    monkeypatch.setattr(dist, "all_gather_object", gathered_with(view_on_node_b(checked.records)))
    check_same_records_on_every_rank(checked)
    monkeypatch.setattr(dist, "all_gather_object", gathered_with(view_on_node_b(other)))
    with pytest.raises(AnnotationError, match=r"the same training records but other image files under the same names "
                                              r"\(rank 1 on node-b against rank 0"):
        check_same_records_on_every_rank(checked)


def test_the_image_check_records_each_images_bytes_digest(tmp_path):
    """What a resume and the ranks compare to tell another image under a record's name: the SHA-256 of the file, read
    once with the decode; none without the check."""
    import hashlib

    from sc_tune.data import images_digest

    checked = ReferringDataset.from_file(SAMPLE_DATA, SAMPLE_IMAGES, check=True)
    for record in checked.records:
        data = open(os.path.join(SAMPLE_IMAGES, record["image"]), "rb").read()
        assert record["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert images_digest(checked.records) is not None
    assert images_digest(ReferringDataset.from_file(SAMPLE_DATA, SAMPLE_IMAGES).records) is None
    changed = [dict(r) for r in checked.records]
    changed[-1]["image_sha256"] = "f" * 64
    assert images_digest(changed) != images_digest(checked.records)
