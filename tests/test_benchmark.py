"""The synthetic benchmark's plumbing: data, warm start, evaluation, SC-Tune steps and the results file.

Tiny sizes and a handful of steps: this checks that the pieces fit, not that SC-Tune helps (the
quick-start measures that).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import pytest
import torch

from sc_tune.synthetic import evaluate as evaluate_module
from sc_tune.synthetic.pipeline import before_after_grid
from sc_tune.synthetic.shapes import ShapesSpec, caption_corpus, cell_box, sample_scene, write_split
from sc_tune.synthetic.warm_start import WarmStartConfig, lr_at, train_warm_start
from sc_tune.visualize import save_cycle_grid

REPO = Path(__file__).resolve().parents[1]


def test_cell_box_is_the_cell_minus_a_whole_pixel_inset():
    # 128 px / 4 cells = 32 px per cell; inset 0.1 * 32 = 3.2 -> 3 px. Cell (col 1, row 2): x 32..64, y 64..96.
    assert cell_box((1, 2), ShapesSpec()) == [35 / 128, 67 / 128, 61 / 128, 93 / 128]


def test_scenes_have_unique_full_captions_and_correct_ambiguity():
    rng = random.Random(3)
    ambiguous = total = 0
    for _ in range(200):
        scene = sample_scene(rng, ShapesSpec())
        fulls = [o.full_caption for o in scene.objects]
        assert len(set(fulls)) == len(fulls) and 2 <= len(fulls) <= 4
        assert len({o.cell for o in scene.objects}) == len(fulls)
        for j, obj in enumerate(scene.objects):
            same_kind = [o for o in scene.objects if o.kind == obj.kind]
            assert scene.is_ambiguous(j) == (len(same_kind) > 1)
            ambiguous += scene.is_ambiguous(j)
            total += 1
    assert 0.35 < ambiguous / total < 0.7  # "often ambiguous": about half of the objects
    assert set(caption_corpus()) >= {"the red circle", "the circle"}


def test_write_split_is_deterministic_and_consistent(tmp_path):
    a = write_split(tmp_path / "a", "heldout", 6, seed=1)
    write_split(tmp_path / "b", "heldout", 6, seed=1)
    write_split(tmp_path / "c", "heldout", 6, seed=2)
    for name in ("heldout.json", "heldout_rec.jsonl", "heldout/00003.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Written again into the same folder (a rerun with other sizes): replaced, not refused.
    assert write_split(tmp_path / "b", "heldout", 6, seed=2) and \
        (tmp_path / "b" / "heldout.json").read_bytes() == (tmp_path / "c" / "heldout.json").read_bytes()
    assert (tmp_path / "a" / "heldout.json").read_bytes() != (tmp_path / "c" / "heldout.json").read_bytes()
    records = json.loads((tmp_path / "a" / "heldout.json").read_text())
    rec = [json.loads(line) for line in (tmp_path / "a" / "heldout_rec.jsonl").read_text().splitlines()]
    assert len(records) == len(rec) == a["objects"]
    for r, q in zip(records, rec):
        assert q["image"] == r["image"] and q["sent"] == r["caption"] and (q["width"], q["height"]) == (128, 128)
        assert q["bbox"] == [round(v * 128) for v in r["bbox"]]
        assert all(v == round(v, 6) for v in r["bbox"])  # 6 decimals, as written (35 / 128 is 0.2734375)
        assert (tmp_path / "a" / r["image"]).exists()
    # The shape is drawn inside its box: the pixel at the box centre has the object's colour.
    from PIL import Image

    from sc_tune.synthetic.shapes import COLOURS

    first = records[0]
    with Image.open(tmp_path / "a" / first["image"]) as image:
        cx, cy = ((first["bbox"][0] + first["bbox"][2]) / 2 * 128, (first["bbox"][1] + first["bbox"][3]) / 2 * 128)
        assert image.getpixel((int(cx), int(cy))) == COLOURS[first["caption"].split()[1]]


def test_the_default_dataset_is_the_one_the_benchmark_figures_were_measured_on(tmp_path):
    """docs/benchmark.md's held-out split, on which every published figure was measured: 400 images, 1,193 objects,
    621 of them ambiguous, 476 in scenes of 4 objects, and 5 images (10 objects) byte-identical to training images;
    and its training split, 5,890 objects, 2,911 of them ambiguous.
    A change to the generator (its seeds, split offsets, object counts, defaults) changes these, and the published
    figures would no longer be the split's."""
    import collections
    import hashlib

    from sc_tune.synthetic.shapes import main

    main(["--root", str(tmp_path)])  # the defaults: seed 0, 2,000 training images, 400 held out
    summary = json.loads((tmp_path / "dataset.json").read_text())
    assert summary["heldout"] == {"split": "heldout", "images": 400, "objects": 1193, "ambiguous": 621}
    assert summary["seed"] == 0
    assert summary["train"] == {"split": "train", "images": 2000, "objects": 5890, "ambiguous": 2911}
    held_out = json.loads((tmp_path / "heldout.json").read_text())
    per_image = collections.Counter(r["image"] for r in held_out)
    assert sum(per_image[r["image"]] >= evaluate_module.CROWDED_MIN_OBJECTS for r in held_out) == 476

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    training = {digest(path) for path in (tmp_path / "train").glob("*.png")}
    repeated = {image for image in per_image if digest(tmp_path / image) in training}
    assert (len(repeated), sum(per_image[image] for image in repeated)) == (5, 10)


def test_each_shape_fills_its_box_and_nothing_outside_it():
    """Pixel by pixel on a 128-px image: a square fills its box exactly (the box's x2 and y2 are exclusive), a circle
    is inscribed in it (its corners are background, its edges' midpoints are not), a triangle stands on the box's
    bottom edge with its apex at the top middle."""
    from sc_tune.synthetic.shapes import BACKGROUND, COLOURS, ShapeObject, ShapesScene, render

    spec = ShapesSpec()
    objects = [ShapeObject("red", "square", (0, 0), cell_box((0, 0), spec)),
               ShapeObject("blue", "circle", (1, 0), cell_box((1, 0), spec)),
               ShapeObject("green", "triangle", (2, 1), cell_box((2, 1), spec))]
    image = render(ShapesScene(objects), spec)
    assert image.size == (128, 128)
    pixels = image.load()
    # The square: cell (0, 0), box [3, 3, 29, 29) px.
    red, blue, green = COLOURS["red"], COLOURS["blue"], COLOURS["green"]
    inside = {(x, y) for x in range(3, 29) for y in range(3, 29)}
    assert all(pixels[x, y] == red for x, y in inside)
    ring = [(x, y) for x in range(2, 30) for y in range(2, 30) if (x, y) not in inside]
    assert all(pixels[x, y] == BACKGROUND for x, y in ring)
    # The circle: cell (1, 0), box [35, 3, 61, 29): centre and edge midpoints blue, corners background.
    assert [pixels[x, y] for x, y in ((48, 16), (35, 16), (60, 16), (48, 3), (48, 28))] == [blue] * 5
    assert [pixels[x, y] for x, y in ((35, 3), (60, 3), (35, 28), (60, 28))] == [BACKGROUND] * 4
    assert pixels[34, 16] == pixels[61, 16] == BACKGROUND
    # The triangle: cell (2, 1), box [67, 35, 93, 61): the bottom edge's corners green, the top corners background,
    # the apex column green near the top.
    assert [pixels[x, y] for x, y in ((67, 60), (92, 60), (80, 36), (80, 59))] == [green] * 4
    assert [pixels[x, y] for x, y in ((67, 35), (92, 35), (67, 40))] == [BACKGROUND] * 3
    assert pixels[80, 61] == pixels[66, 60] == pixels[93, 60] == BACKGROUND


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = WarmStartConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # the cosine starts at the peak, never above it
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(160, cfg) == pytest.approx(1e-4)  # past the schedule's end: the floor, not a second cosine


def test_summarize_benchmark_counts_hand_made_outcomes():
    records = [{"image": "a.png", "caption": "the red circle", "terse": "the circle", "ambiguous": i < 2}
               for i in range(4)]
    rows = [{"caption": c, "iou": iou} for c, iou in
            [("the circle", 1.0), ("the red circle", 0.2), ("the blue", 0.0), ("the red circle", 0.5)]]
    cycle = {"mean_iou": 0.425, "acc@0.5": 0.5, "parse_failure_rate": 0.25}
    rec = {"mean_iou": 0.75, "acc@0.5": 0.75, "parse_failure_rate": 0.0}
    m = evaluate_module.summarize_benchmark(records, cycle, rows, rec)
    assert m["cycle_acc50_ambiguous"] == 0.5  # objects 0 (hit) and 1 (miss) are the ambiguous ones
    assert (m["cycle_iou"], m["cycle_acc50"], m["cycle_parse_fail"], m["rec_acc50"]) == (0.425, 0.5, 0.25, 0.75)
    assert (m["caption_full"], m["caption_terse"], m["caption_valid"]) == (0.5, 0.25, 0.75)
    assert (m["objects"], m["ambiguous_objects"]) == (4, 2)
    with pytest.raises(ValueError, match="^3 cycle results for 4 records$"):
        evaluate_module.summarize_benchmark(records, cycle, rows[:3], rec)
    with pytest.raises(ValueError, match="^0 cycle results for 0 records$"):
        evaluate_module.summarize_benchmark([], cycle, [], rec)
    # Acc@0.5 is inclusive: an ambiguous object re-grounded at IoU 0.5 exactly is a hit.
    at_half = [dict(rows[0]), dict(rows[1], iou=0.5), *rows[2:]]
    assert evaluate_module.summarize_benchmark(records, cycle, at_half, rec)["cycle_acc50_ambiguous"] == 1.0
    # "the blue" names a colour the red circle does not have: 1 of 4, all in one 4-object (crowded) scene.
    assert (m["wrong_attribute"], m["wrong_attribute_crowded"], m["crowded_objects"]) == (0.25, 0.25, 4)


def test_rates_over_a_single_object_are_whole():
    """One ambiguous object re-grounded (IoU 0.7) from a caption that gets both attributes wrong: every rate is 0 or
    1, each divided by one object, not by a floor above it."""
    records = [{"image": "a.png", "caption": "the red circle", "terse": "the circle", "ambiguous": True}]
    rows = [{"caption": "the blue square", "iou": 0.7}]
    m = evaluate_module.summarize_benchmark(records, {"mean_iou": 0.7, "acc@0.5": 1.0, "parse_failure_rate": 0.0},
                                            rows, {"mean_iou": 0.0, "acc@0.5": 0.0, "parse_failure_rate": 1.0})
    assert (m["cycle_acc50_ambiguous"], m["wrong_attribute"], m["wrong_colour"], m["wrong_shape"]) == (1, 1, 1, 1)
    assert (m["caption_full"], m["caption_terse"], m["caption_valid"]) == (0, 0, 0)
    full = evaluate_module.summarize_benchmark(records, {"mean_iou": 0.7, "acc@0.5": 1.0, "parse_failure_rate": 0.0},
                                               [{"caption": "the red circle", "iou": 0.7}],
                                               {"mean_iou": 0.0, "acc@0.5": 0.0, "parse_failure_rate": 1.0})
    assert (full["caption_full"], full["caption_terse"], full["caption_valid"], full["wrong_attribute"]) == (1, 0, 1, 0)


def _object(image: str, colour: str, kind: str) -> dict:
    return {"image": image, "caption": f"the {colour} {kind}", "terse": f"the {kind}"}


# Image a.png holds 4 objects (crowded: CROWDED_MIN_OBJECTS = 4), b.png 3. Per object, the caption and what it gets
# wrong, by hand: a two-colour caption is wrong when one colour is not the object's; a caption that names no
# colour is not wrong about colour; babble after a word ("7]}") does not hide the word.
HAND_MADE = [
    (_object("a.png", "red", "circle"), "the red blue circle", "colour"),
    (_object("a.png", "blue", "circle"), "the red circle", "colour"),
    (_object("a.png", "green", "square"), "the square", ""),
    (_object("a.png", "yellow", "triangle"), "the yellow circle", "shape"),
    (_object("b.png", "red", "square"), "the red square", ""),
    (_object("b.png", "green", "triangle"), "the triangle7]}", ""),
    (_object("b.png", "blue", "square"), "the circle7]}", "shape"),
]


def test_wrong_attribute_rates_on_hand_made_captions():
    records, captions, _ = zip(*HAND_MADE)
    m = evaluate_module.truthfulness(list(records), list(captions))
    # wrong: objects 0, 1 (colour), 3 and 6 (shape) = 4 of 7; crowded: 3 of the 4 objects of a.png.
    assert m["wrong_attribute"] == pytest.approx(4 / 7)
    assert m["wrong_colour"] == pytest.approx(2 / 7) and m["wrong_shape"] == pytest.approx(2 / 7)
    assert (m["crowded_objects"], m["crowded_min_objects"]) == (4, 4)
    assert m["wrong_attribute_crowded"] == pytest.approx(3 / 4)
    for record, caption, wrong in HAND_MADE:
        colour, kind = evaluate_module.object_attributes(record, 0)
        assert evaluate_module.wrong_attributes(caption, colour, kind) == ("colour" in wrong, "shape" in wrong)
    # No crowded scene: no crowded rate was measured (None, not 0).
    assert evaluate_module.truthfulness(list(records[4:]), list(captions[4:]))["wrong_attribute_crowded"] is None
    bad = dict(records[0], caption="the big circle")
    with pytest.raises(ValueError, match="record 0: field 'caption' 'the big circle'"):
        evaluate_module.truthfulness([bad], ["the circle"])


def test_load_split_counts_a_scene_on_the_whole_split(tmp_path):
    """A limit that cuts the last image's objects keeps that scene's true size (crowded or not)."""
    write_split(tmp_path, "heldout", 6, seed=1)
    records = json.loads((tmp_path / "heldout.json").read_text())
    sizes = {image: sum(r["image"] == image for r in records) for image in {r["image"] for r in records}}
    cut, _ = evaluate_module.load_split(tmp_path, "heldout", limit=len(records) - 1)
    assert [r["scene_objects"] for r in cut] == [sizes[r["image"]] for r in records[:-1]]
    assert sizes[records[-1]["image"]] >= 2 and len(cut) == len(records) - 1


def test_benchmark_table_has_the_truth_columns_and_the_commit():
    from tests.conftest import script_module

    benchmark = script_module("benchmark")
    base = {"cycle_acc50": 0.6, "cycle_acc50_ambiguous": 0.4, "cycle_iou": 0.6, "rec_acc50": 0.9, "caption_full": 0.1,
            "cycle_parse_fail": 0.0}
    before = dict(base, wrong_attribute=0.004, wrong_attribute_crowded=0.007, commit="abc1234")
    runs = {"sc_tune": {0: {"after": dict(base, wrong_attribute=0.019, wrong_attribute_crowded=0.041), "seconds": 60,
                            "commit": "def5678-dirty"},
                        1: {"after": dict(base, wrong_attribute=0.021, wrong_attribute_crowded=0.039), "seconds": 60,
                            "commit": "def5678-dirty"}},
            "no_kl": {0: {"after": base, "seconds": 60}}}  # measured before the metric and the commit existed
    lines = benchmark.table(before, runs).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-1] == "commit" and "wrong colour or shape" in header and "wrong colour or shape, crowded" in header
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    column = header.index("wrong colour or shape")
    assert cells["warm start (before)"][column] == "0.4" and cells["warm start (before)"][-1] == "abc1234"
    assert cells["sc_tune seed 0"][column:column + 2] == ["1.9", "4.1"] and cells["sc_tune seed 0"][-1] == "def5678-dirty"
    assert cells["**sc_tune mean**"][column:column + 2] == ["2.0", "4.0"]
    assert cells["no_kl seed 0"][column:column + 2] == ["n/a", "n/a"] and cells["no_kl seed 0"][-1] == "n/a"


def test_source_commit_names_head_and_a_dirty_tree(tmp_path):
    import subprocess

    from sc_tune.synthetic.pipeline import source_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    assert source_commit(tmp_path).startswith("unknown (")  # not a git checkout: said, not guessed
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("outputs do not count")
    assert source_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("2")
    assert source_commit(tmp_path) == head + "-dirty"


def test_tiny_tokenizers_pad_away_from_id_0_and_the_warm_start_recipe_keeps_its_committed_tokenizer():
    """The tests' tiny tokenizers pad with a token other than id 0, as released ones do; the warm start's build keeps
    the pad at 0, where the committed warm start's tokenizer has it, so its recipe rebuilds that tokenizer."""
    from transformers import AutoTokenizer

    from sc_tune.synthetic.warm_start import build_model
    from sc_tune.tiny.chat import build_tokenizer
    from sc_tune.tiny.configs import tiny_spec

    committed = AutoTokenizer.from_pretrained(str(Path(__file__).parents[1] / "checkpoints" / "warm_start"))
    assert committed.pad_token_id == 0
    spec = tiny_spec("qwen3_vl")
    rebuilt = build_tokenizer(spec, caption_corpus(), pad_first=True)
    assert rebuilt.get_vocab() == committed.get_vocab()
    tests = build_tokenizer(spec, caption_corpus())
    assert tests.pad_token == committed.pad_token and tests.pad_token_id != 0
    assert set(tests.get_vocab()) == set(committed.get_vocab())  # the same tokens, the pad moved
    cfg = WarmStartConfig(hidden=32, layers=1, vision_width=16, text_heads=2, text_kv_heads=1)
    model, tokenizer, _ = build_model(cfg)
    assert tokenizer.get_vocab() == committed.get_vocab() and model.generation_config.pad_token_id == 0


def test_the_warm_start_recipes_defaults_are_the_committed_warm_starts_build():
    """scripts/build_warm_start.py with its defaults rebuilds checkpoints/warm_start (its docstring's command): every
    setting the committed build recorded is the recipe's default. The one field added since, the Gated DeltaNet
    layers' initial decay, does not touch the committed Qwen3-VL (no hybrid layer)."""
    from sc_tune.jsonio import read_json

    recorded = read_json(REPO / "checkpoints" / "warm_start" / "warm_start.json")["config"]
    defaults = dataclasses.asdict(WarmStartConfig())
    assert {key: defaults[key] for key in recorded} == recorded
    assert set(defaults) - set(recorded) == {"linear_attention_init"}
    assert recorded["model_type"] == "qwen3_vl"


def test_build_warm_start_takes_every_recipe_field_as_a_flag(monkeypatch, capsys):
    """scripts/build_warm_start.py: one flag per WarmStartConfig field, of the field's type, defaulting to the
    recipe's default; the run goes to --output_dir and its final metrics are printed."""
    import sys

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    sys.modules.pop("build_warm_start", None)
    import build_warm_start

    runs = []
    monkeypatch.setattr(build_warm_start, "train_warm_start",
                        lambda cfg, output_dir, log: runs.append((cfg, output_dir)) or {"step": cfg.max_steps})
    build_warm_start.main(["--output_dir", "out/ws"])
    build_warm_start.main(["--output_dir", "out/ws2", "--model_type", "qwen3_5", "--hidden", "64", "--p_terse", "0.5",
                           "--text_layer_types", "full_attention,linear_attention", "--max_steps", "12"])
    assert runs[0] == (WarmStartConfig(), "out/ws")
    assert runs[1] == (WarmStartConfig(model_type="qwen3_5", hidden=64, p_terse=0.5, max_steps=12,
                                       text_layer_types="full_attention,linear_attention"), "out/ws2")
    assert capsys.readouterr().out.splitlines() == ["final {'step': 8000}", "final {'step': 12}"]


def _warm_start_adapter():
    """The adapter of a warm start's tiny Qwen3-VL (its tokenizer holds the captions' words)."""
    from sc_tune.adapters import adapter_class
    from sc_tune.tiny import build_tiny

    model, tokenizer, processor = build_tiny("qwen3_vl", corpus=caption_corpus(), image_size=128, hidden=32, layers=1,
                                             vision_width=16)
    return adapter_class("qwen3_vl").from_parts(tokenizer, processor, model.config)


def _scene_of(*objects: tuple[str, str]):
    """A scene of (colour, kind) objects in the top row's cells, left to right."""
    from sc_tune.synthetic.shapes import ShapeObject, ShapesScene

    spec = ShapesSpec()
    return ShapesScene([ShapeObject(colour, kind, (i, 0), cell_box((i, 0), spec))
                        for i, (colour, kind) in enumerate(objects)])


def test_warm_start_samples_teach_terse_captions_and_query_the_locator_with_unambiguous_ones_only():
    """Per object, one describer sample (box -> the terse caption with probability p_terse, else the full one) and
    one locator sample (caption -> box), built by the family's own adapter. The locator's query is terse only where
    the terse caption names one object (with probability p_locator_terse): an ambiguous terse query would teach it to
    guess."""
    from PIL import Image

    from sc_tune.synthetic.warm_start import scene_samples

    adapter = _warm_start_adapter()
    scene = _scene_of(("red", "circle"), ("blue", "circle"), ("green", "square"))  # two circles: ambiguous
    image = adapter.prepare_image(Image.new("RGB", (128, 128)))

    def captions(p_terse, p_locator_terse):
        cfg = WarmStartConfig(p_terse=p_terse, p_locator_terse=p_locator_terse)
        samples = scene_samples(scene, image, adapter, random.Random(0), cfg)
        assert len(samples) == 2 * len(scene.objects)
        for obj, describer, locator in zip(scene.objects, samples[0::2], samples[1::2]):
            assert describer.prompt == adapter.describer_prompt(obj.bbox, image) and describer.image is image
            query = next(q for q in (obj.terse_caption, obj.full_caption)
                         if locator.prompt == adapter.locator_prompt(q, image))
            assert locator.target == adapter.locator_target(obj.bbox, image, query)
            yield (next(c for c in (obj.terse_caption, obj.full_caption)
                        if describer.target == adapter.describer_target(c)), query)

    assert list(captions(1.0, 1.0)) == [("the circle", "the red circle"), ("the circle", "the blue circle"),
                                        ("the square", "the square")]
    assert list(captions(0.0, 0.0)) == [("the red circle", "the red circle"), ("the blue circle", "the blue circle"),
                                        ("the green square", "the green square")]


def test_warm_start_batches_are_fresh_samples_deterministic_from_the_seed():
    """sample_batches: batches of batch_size samples, no sample twice (each scene is new), the same batches for the
    same seed and others for another seed."""
    from sc_tune.synthetic.warm_start import sample_batches

    adapter = _warm_start_adapter()

    def first(seed, count=12):
        batches = sample_batches(adapter, WarmStartConfig(seed=seed, batch_size=5), buffer_size=16)
        return [next(batches) for _ in range(count)]

    batches = first(0)
    assert [len(b) for b in batches] == [5] * 12
    assert len({id(sample) for batch in batches for sample in batch}) == 60
    texts = lambda bs: [(s.prompt, s.target) for b in bs for s in b]  # noqa: E731
    assert texts(first(0)) == texts(batches) and texts(first(1)) != texts(batches)


@pytest.fixture(scope="module")
def tiny_warm_start(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    cfg = WarmStartConfig(hidden=64, layers=1, vision_width=32, batch_size=8, max_steps=4, warmup_steps=2,
                          eval_every=2, eval_objects=6, heldout_images=3, threads=1)
    metrics = train_warm_start(cfg, root, log=lambda line: None)
    return root, metrics


def test_warm_start_trains_saves_and_reloads(tiny_warm_start):
    from sc_tune.modeling import load_model_and_adapter
    from sc_tune.tiny import build_tiny

    root, metrics = tiny_warm_start
    assert metrics["step"] == 4 and metrics["objects"] == 6
    assert {"step_2", "step_4", "last", "history.json"} <= {p.name for p in root.iterdir()}
    assert len(json.loads((root / "history.json").read_text())) == 2
    model, adapter = load_model_and_adapter(str(root / "last"))
    assert type(adapter).__name__ == "Qwen3VLAdapter"
    initial, _, _ = build_tiny("qwen3_vl", corpus=caption_corpus(), image_size=128, seed=0, hidden=64, layers=1,
                               vision_width=32)
    trained = dict(model.named_parameters())
    changed = [n for n, p in initial.named_parameters() if not torch.equal(p, trained[n])]
    assert len(changed) > 10  # SFT moved the weights; the saved checkpoint holds the moved ones
    # The logged metrics are the benchmark's evaluators' numbers on the saved model (no second eval loop).
    again = evaluate_module.evaluate_benchmark(model, adapter, root / "eval_data", limit=6)
    assert again["rows"] == []  # rows for figures only where asked for
    for key in ("cycle_acc50", "cycle_iou", "rec_acc50", "rec_iou", "caption_valid", "cycle_parse_fail"):
        assert metrics[key] == pytest.approx(again[key]), key


def test_warm_start_logs_each_windows_mean_loss_and_saves_at_every_evaluation_and_the_last_step(tmp_path,
                                                                                                  monkeypatch):
    """The build's bookkeeping, on 3 steps evaluated every 2: evaluations (and step_<n> folders) at step 2 and at the
    last step, each logging the mean training loss of its own window, the learning rate of its last step and the
    training minutes so far (the clock here: 30 s per step); gradients clipped at norm 1; ``last`` holds the final
    metrics and the config. A second build into the same (nested) folder replaces what it writes."""
    from types import SimpleNamespace

    from sc_tune.jsonio import read_json
    from sc_tune.synthetic import warm_start

    losses, clipped, clock = [], [], iter(range(0, 10_000, 30))
    real_initial_model, real_clip = warm_start.initial_model, torch.nn.utils.clip_grad_norm_

    def record_loss(module, args, kwargs, output):
        if kwargs.get("labels") is not None:  # a training step (evaluation generates without labels)
            losses.append(output.loss.item())

    def initial_model(cfg):
        model, adapter = real_initial_model(cfg)
        model.register_forward_hook(record_loss, with_kwargs=True)
        return model, adapter

    monkeypatch.setattr(warm_start, "initial_model", initial_model)
    monkeypatch.setattr(warm_start, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clipped.append(max_norm) or real_clip(params, max_norm))
    cfg = WarmStartConfig(hidden=32, layers=1, vision_width=16, batch_size=4, max_steps=3, warmup_steps=2,
                          eval_every=2, eval_objects=2, heldout_images=1, threads=1)
    output_dir = tmp_path / "runs" / "warm"
    final = train_warm_start(cfg, output_dir, log=lambda line: None)

    history = read_json(output_dir / "history.json")
    assert len(losses) == 3 and clipped == [1.0] * 3
    assert [h["step"] for h in history] == [2, 3]
    assert [h["loss"] for h in history] == [round((losses[0] + losses[1]) / 2, 4), round(losses[2], 4)]
    assert [h["lr"] for h in history] == [lr_at(1, cfg), lr_at(2, cfg)]
    assert [h["train_minutes"] for h in history] == [1.0, 1.5]
    assert final == history[-1]
    for folder, metrics in (("step_2", history[0]), ("step_3", history[1]), ("last", history[1])):
        recorded = read_json(output_dir / folder / "warm_start.json")
        assert recorded == {"config": dataclasses.asdict(cfg), "metrics": metrics}, folder
    train_warm_start(dataclasses.replace(cfg, max_steps=1, eval_every=1), output_dir, log=lambda line: None)
    assert [h["step"] for h in read_json(output_dir / "history.json")] == [1]
    assert read_json(output_dir / "last" / "warm_start.json")["metrics"]["step"] == 1


def test_warm_start_continues_from_a_saved_checkpoint(tiny_warm_start, tmp_path):
    """--init_from resumes training from a step_<n> folder: one small step moves its weights a little (a fresh
    random model would be far from them), and a folder of another family is refused by name."""
    from sc_tune.modeling import load_model_and_adapter

    root, _ = tiny_warm_start
    start = dict(load_model_and_adapter(str(root / "last"))[0].named_parameters())
    cfg = WarmStartConfig(batch_size=4, max_steps=1, warmup_steps=1, lr=1e-5, eval_every=1, eval_objects=2,
                          heldout_images=1, threads=1, init_from=str(root / "last"))
    train_warm_start(cfg, tmp_path / "more", log=lambda line: None)
    continued = dict(load_model_and_adapter(str(tmp_path / "more" / "last"))[0].named_parameters())
    assert continued.keys() == start.keys()
    gaps = [(continued[n] - p).abs().max().item() for n, p in start.items()]
    assert max(gaps) < 1e-3 and sum(g > 0 for g in gaps) > 10
    recorded = json.loads((tmp_path / "more" / "last" / "warm_start.json").read_text())["config"]
    assert recorded["init_from"] == str(root / "last")
    with pytest.raises(ValueError, match="holds a 'qwen3_vl' model.*--model_type qwen3_vl"):
        train_warm_start(dataclasses.replace(cfg, model_type="qwen3_5"), tmp_path / "wrong", log=lambda line: None)


def test_benchmark_pipeline_end_to_end(tiny_warm_start, tmp_path):
    """Data -> before -> a few SC-Tune steps with finetune.py -> after -> results.json and the PNG."""
    if not (REPO / "finetune.py").exists():
        pytest.skip("finetune.py (the lead's trainer) is not in the repository yet")
    from sc_tune.synthetic import quickstart

    root, _ = tiny_warm_start
    results = quickstart.main(["--output_dir", str(tmp_path / "qs"), "--warm_start", str(root / "last"),
                               "--max_steps", "4", "--train_images", "8", "--heldout_images", "4", "--threads", "1",
                               "--set", "per_device_train_batch_size=4", "describer_update_steps=1",
                               "locator_update_steps=1", "skip_preflight=True"])  # a 4-step warm start writes no box
    saved = json.loads((tmp_path / "qs" / "results.json").read_text())
    for phase in ("before", "after"):
        for key in ("cycle_iou", "cycle_acc50", "rec_acc50", "cycle_parse_fail"):
            assert 0.0 <= saved[phase][key] <= 1.0
        assert saved[phase]["objects"] == saved["data"]["heldout"]["objects"]
    assert results["checkpoint"] != str(root / "last") and Path(results["checkpoint"], "config.json").exists()
    assert (tmp_path / "qs" / "cycles.png").stat().st_size > 1000


def _recorded_quickstart(monkeypatch, argv: list[str]) -> tuple[dict, dict]:
    """``quickstart.main(argv)`` with its steps replaced by recorders that answer as the real ones do (the data's
    summary, metrics with rows, a checkpoint and seconds): what each step was given, and what the command returned.
    The clock reads 1,000 s at the start and 2,230 s at the end."""
    from types import SimpleNamespace

    from sc_tune.synthetic import quickstart

    calls = {"evaluate": []}

    def metrics(tag: str, acc: float) -> dict:
        rows = [{"id": i, "ambiguous": i % 2 == 1, "tag": tag} for i in range(20)]
        return {"objects": 20, "cycle_acc50": acc, "cycle_acc50_ambiguous": acc / 2, "cycle_iou": acc,
                "cycle_parse_fail": 0.0, "rec_acc50": 0.5, "caption_full": 0.25, "caption_terse": 0.75,
                "wrong_attribute": 0.1, "wrong_attribute_crowded": None, "eval_seconds": 12.4, "rows": rows}

    def make_data(root, seed, train_images, heldout_images):
        calls["data"] = (Path(root), seed, train_images, heldout_images)
        Path(root).mkdir(parents=True)  # as write_dataset does
        return {"seed": seed, "train": {"images": train_images, "objects": 57},
                "heldout": {"images": heldout_images, "objects": 20, "ambiguous": 9}}

    def evaluate_checkpoint(path, data_root, keep_rows, threads):
        calls["evaluate"].append((str(path), Path(data_root), keep_rows, threads))
        return metrics("before", 0.667) if len(calls["evaluate"]) == 1 else metrics("after", 0.928)

    def run_sc_tune(model_path, data_root, output_dir, seed, max_steps, overrides, threads):
        calls["sc_tune"] = (str(model_path), Path(data_root), Path(output_dir), seed, max_steps, overrides, threads)
        return Path(output_dir) / "checkpoint-750", 600.0

    def grid(before_rows, after_rows, path):
        calls["grid"] = ([r["id"] for r in before_rows], {r["tag"] for r in before_rows},
                         [r["id"] for r in after_rows], {r["tag"] for r in after_rows})
        return str(path)

    clock = iter([1000.0, 2230.0])
    monkeypatch.setattr(quickstart, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(quickstart, "source_commit", lambda: "abc1234")
    monkeypatch.setattr(quickstart, "phase_summaries", lambda path: [f"read {Path(path).name}", "locator line"])
    for name, recorder in (("make_data", make_data), ("evaluate_checkpoint", evaluate_checkpoint),
                           ("run_sc_tune", run_sc_tune), ("before_after_grid", grid)):
        monkeypatch.setattr(quickstart, name, recorder)  # quickstart's names only; the pipeline keeps its own
    return calls, quickstart.main(argv)


def test_the_quickstart_evaluates_the_warm_start_then_its_own_checkpoint_and_writes_what_they_measured(
        tmp_path, monkeypatch, capsys):
    """The quick-start's wiring, each step recorded: the data under the output folder, "before" on the warm start,
    SC-Tune with the given seed, steps, overrides and threads, "after" on the checkpoint SC-Tune saved (not the warm
    start), the picture from the before rows' ambiguous objects beside the same objects after; then results.json (the
    rows left out, the finetune.py command as run), results.md (the table) and the lines it prints."""
    from sc_tune.synthetic.pipeline import REPO as PIPELINE_REPO
    from sc_tune.synthetic.pipeline import before_after_table, sc_tune_command

    out = tmp_path / "qs"
    calls, results = _recorded_quickstart(monkeypatch, [
        "--output_dir", str(out), "--warm_start", "ckpt/warm", "--seed", "3", "--data_seed", "5", "--max_steps", "40",
        "--train_images", "12", "--heldout_images", "6", "--threads", "2", "--set", "kl_coef=0"])
    overrides = {"kl_coef": "0"}
    assert calls["data"] == (out / "data", 5, 12, 6)
    assert calls["sc_tune"] == ("ckpt/warm", out / "data", out / "sc_tune", 3, 40, overrides, 2)
    assert calls["evaluate"] == [("ckpt/warm", out / "data", 64, 2),
                                 (str(out / "sc_tune" / "checkpoint-750"), out / "data", 64, 2)]
    assert calls["grid"] == ([1, 3, 5, 7, 9, 11, 13, 15], {"before"}, [1, 3, 5, 7, 9, 11, 13, 15], {"after"})

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert {key for key in saved} == {"commit", "before", "after", "sc_tune_seconds", "total_seconds", "checkpoint",
                                      "figure", "command", "data"}
    assert (saved["commit"], saved["sc_tune_seconds"], saved["total_seconds"]) == ("abc1234", 600.0, 1230.0)
    assert (saved["before"]["cycle_acc50"], saved["after"]["cycle_acc50"]) == (0.667, 0.928)
    assert "rows" not in saved["before"] and "rows" not in saved["after"]
    assert saved["checkpoint"] == str(out / "sc_tune" / "checkpoint-750") and saved["figure"] == str(out / "cycles.png")
    assert saved["command"] == sc_tune_command("ckpt/warm", out / "data", out / "sc_tune", 3, 40, overrides)[1:]
    assert saved["command"][0] == str(PIPELINE_REPO / "finetune.py")  # the interpreter's path is left out
    assert saved["data"]["heldout"]["objects"] == 20
    table = before_after_table(results["before"], results["after"])
    assert table.splitlines()[2] == "| cycle Acc@0.5 | 66.7 % | 92.8 % | +26.1 |"
    assert (out / "results.md").read_text() == table + "\n"

    assert capsys.readouterr().out.splitlines() == [
        "[quickstart] data: 57 train objects, 20 held-out objects (9 with an ambiguous short caption)",
        "[quickstart] before (12 s): cycle Acc@0.5 66.7 %, REC Acc@0.5 50.0 %",
        f"[quickstart] SC-Tune: 40 steps (log: {out / 'sc_tune' / 'finetune.log'})",
        "[quickstart]   read trainer_state.json",
        "[quickstart]   locator line",
        *table.splitlines(),
        f"[quickstart] wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'cycles.png'} "
        "(SC-Tune 10.0 min, total 20.5 min)"]


def test_the_quickstart_by_default_runs_the_published_settings(tmp_path, monkeypatch):
    """With no flags, the quick-start runs what docs/benchmark.md publishes: the shapes data of seed 0 at its split
    sizes, the committed warm start, SC-Tune seed 0 for SC_TUNE_STEPS steps with no override, one torch thread (the
    fastest at this size), into outputs/quickstart."""
    from sc_tune.synthetic.pipeline import SC_TUNE_STEPS, WARM_START
    from sc_tune.synthetic.shapes import HELDOUT_IMAGES, TRAIN_IMAGES

    monkeypatch.chdir(tmp_path)
    calls, _ = _recorded_quickstart(monkeypatch, [])
    out = Path("outputs/quickstart")
    assert calls["data"] == (out / "data", 0, TRAIN_IMAGES, HELDOUT_IMAGES)
    assert calls["sc_tune"] == (str(WARM_START), out / "data", out / "sc_tune", 0, SC_TUNE_STEPS, {}, 1)
    assert [call[0] for call in calls["evaluate"]] == [str(WARM_START), str(out / "sc_tune" / "checkpoint-750")]
    assert (tmp_path / out / "results.json").exists()


def test_before_after_grid_draws_pairs(tmp_path):
    from PIL import Image

    image_path = tmp_path / "im.png"
    Image.new("RGB", (128, 128), (200, 200, 200)).save(image_path)
    row = {"image": str(image_path), "bbox": [0.1, 0.1, 0.4, 0.4], "caption": "the circle", "pred": None, "iou": 0.0}
    path = before_after_grid([row] * 3, [dict(row, pred=[0.1, 0.1, 0.4, 0.4], iou=1.0)] * 3, tmp_path / "g.png",
                             columns=2)
    with Image.open(path) as grid:
        reference = Image.open(save_cycle_grid(tmp_path / "ref.png", [Image.open(image_path)] * 6,
                                               [row["bbox"]] * 6, ["c"] * 6, [None, row["bbox"]] * 3, columns=4))
        assert grid.size == reference.size  # 3 pairs as 6 tiles, 2 pairs (4 tiles) per line


def test_warm_start_model_takes_head_counts_from_the_config():
    from sc_tune.synthetic.warm_start import build_model

    model, tokenizer, _ = build_model(WarmStartConfig(hidden=64, layers=1, vision_width=32, text_heads=4, text_kv_heads=2))
    text = model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (4, 2, 32)
    assert model.model.language_model.layers[0].self_attn.q_proj.out_features == 4 * 32
    assert text.vocab_size == len(tokenizer)


def test_warm_start_takes_a_hybrid_layer_pattern_and_refuses_it_elsewhere():
    from sc_tune.synthetic.warm_start import build_model

    small = dict(hidden=64, vision_width=32)
    model, _, _ = build_model(WarmStartConfig(model_type="qwen3_5", text_layer_types="full_attention,linear_attention",
                                              **small))
    assert model.config.text_config.layer_types == ["full_attention", "linear_attention"]
    default, _, _ = build_model(WarmStartConfig(model_type="qwen3_5", **small))
    assert default.config.text_config.layer_types == ["linear_attention", "full_attention"]
    with pytest.raises(ValueError, match="only a hybrid text model"):
        build_model(WarmStartConfig(model_type="qwen3_vl", text_layer_types="linear_attention,full_attention", **small))


@pytest.mark.parametrize("model_type", ["qwen3_5", "internvl"])
def test_warm_start_builds_another_architecture(model_type, tmp_path):
    """--model_type picks the family: a Qwen3.5 (hybrid linear-attention LM) or an InternVL warm start trains and
    reloads; InternVL's 128 px tile is one 4 x 4 grid of tokens, one per cell of the shapes grid."""
    from sc_tune.modeling import load_model_and_adapter

    cfg = WarmStartConfig(model_type=model_type, hidden=64, layers=2, vision_width=32, batch_size=4, max_steps=2,
                          warmup_steps=1, eval_every=2, eval_objects=4, heldout_images=2, threads=1)
    metrics = train_warm_start(cfg, tmp_path, log=lambda line: None)
    assert metrics["step"] == 2
    model, adapter = load_model_and_adapter(str(tmp_path / "last"))
    assert model.config.model_type == model_type
    if model_type == "qwen3_5":
        assert type(adapter).__name__ == "Qwen35Adapter"
        assert "linear_attention" in model.config.text_config.layer_types
    else:
        from PIL import Image

        assert type(adapter).__name__ == "InternVLAdapter"
        image = adapter.prepare_image(Image.new("RGB", (128, 128)))
        assert (image.num_tokens, image.frame, model.config.vision_config.patch_size) == (16, (128, 128), [16, 16])


# ---------------------------------------------------------------- the quick-start's and the benchmark's reporting
def test_the_before_after_table_prints_percentages_and_their_change():
    from sc_tune.synthetic.pipeline import TABLE_KEYS, before_after_table

    before = {key: 0.25 for key, _ in TABLE_KEYS} | {"objects": 1193, "cycle_acc50": 0.667, "rec_acc50": 0.9}
    after = {key: 0.5 for key, _ in TABLE_KEYS} | {"cycle_acc50": 0.928, "rec_acc50": 0.875,
                                                     "wrong_attribute_crowded": None}
    lines = before_after_table(before, after).splitlines()
    assert lines[:4] == ["| metric (held-out, 1193 objects) | before (warm start) | after SC-Tune | change |",
                         "| --- | --- | --- | --- |",
                         "| cycle Acc@0.5 | 66.7 % | 92.8 % | +26.1 |",
                         "| cycle Acc@0.5 (ambiguous) | 25.0 % | 50.0 % | +25.0 |"]
    assert "| REC Acc@0.5 | 90.0 % | 87.5 % | -2.5 |" in lines
    # No crowded scene in a small split: no rate, and no change to compute.
    assert lines[-1] == "| wrong colour or shape (crowded scenes) | 25.0 % | none measured | |"
    assert len(lines) == 2 + len(TABLE_KEYS)


def test_each_phase_of_the_log_is_summarised_once_with_its_means(tmp_path):
    from sc_tune.synthetic.pipeline import phase_summaries

    def describer(step, reward, share=1.0):
        return {"step": step, "phase": 0, "phase/describer": share, "describer/reward": reward,
                "describer/baseline": 0.5, "describer/kl": -0.001, "describer/clip_frac": 0.1,
                "describer/parse_failure": 0.25}

    history = [{"step": 0, "loss": 1.0},  # no phase: not a training window
               describer(10, 0.5), describer(20, 0.75, share=0.5),  # half describer: still the describer's
               {"step": 30, "phase": 1, "phase/describer": 0.4, "locator/loss": 0.25, "locator/token_acc": 0.5},
               {"step": 40, "phase": 1, "phase/describer": 0.0, "locator/loss": 0.75},
               describer(50, 1.0)]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert phase_summaries(tmp_path / "trainer_state.json") == [
        "describer steps   10-  20: reward 0.625, baseline 0.500, KL -0.0010, clip 0.100, parse failures 25.0%",
        "locator   steps   30-  40: loss 0.5000, answer-token accuracy 50.0%",  # the accuracy of the one that has it
        "describer steps   50-  50: reward 1.000, baseline 0.500, KL -0.0010, clip 0.100, parse failures 25.0%",
    ]
    # A first window of one log line is a phase of its own.
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history[1:2] + history[3:4]}))
    assert [line[:25] for line in phase_summaries(tmp_path / "trainer_state.json")] == [
        "describer steps   10-  10", "locator   steps   30-  30"]


def test_the_final_checkpoint_is_the_exported_folder_else_the_highest_step(tmp_path):
    from sc_tune.synthetic.pipeline import final_checkpoint

    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert final_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # by number: 10 after 9
    (tmp_path / "config.json").write_text("{}")
    assert final_checkpoint(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match=f"^finetune.py left no checkpoint in {tmp_path / 'empty'}$"):
        final_checkpoint(tmp_path / "empty")


def test_the_baselines_sample_as_many_captions_as_sc_tune():
    """750 steps: 6 cycles of 50 describer rollouts (2 PPO epochs each: 100 steps) and 25 locator steps, so 300
    rollouts of 32 boxes; group_mean's 8 boxes x 4 samples is the same 9,600 captions; with no locator phase every
    step is the describer's: 375 rollouts."""
    from sc_tune.synthetic.pipeline import BASELINES, SC_TUNE_STEPS, VARIANTS, sampled_captions

    assert SC_TUNE_STEPS == 750 and sampled_captions(750) == 300 * 32
    assert {name: sampled_captions(750, VARIANTS[name]) for name in BASELINES} == dict.fromkeys(BASELINES, 9600)
    assert sampled_captions(750, VARIANTS["no_locator"]) == 375 * 32
    assert sampled_captions(3, {"describer_update_steps": 1, "locator_update_steps": 1, "ppo_epochs": 1}) == 2 * 32


def test_overrides_are_flag_value_pairs_and_replace_the_benchmarks_settings():
    from sc_tune.synthetic.pipeline import SC_TUNE_ARGS, parse_overrides, sc_tune_command

    overrides = parse_overrides(["kl_coef=0", "--describer_lr=1e-3", "lora_target_modules=a=b"])
    assert overrides == {"kl_coef": "0", "describer_lr": "1e-3", "lora_target_modules": "a=b"}
    assert parse_overrides(None) == {}
    for bad in ("kl_coef", "=3"):
        with pytest.raises(ValueError, match=f"got {bad!r}$"):
            parse_overrides([bad])
    command = sc_tune_command("model", "data", "out", 3, 40, overrides)
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags["--kl_coef"] == "0" and flags["--describer_lr"] == "1e-3" and flags["--seed"] == "3"
    assert flags["--max_steps"] == "40" and flags["--data_path"] == str(Path("data") / "train.json")
    assert flags["--locator_lr"] == str(SC_TUNE_ARGS["locator_lr"])


def test_a_failed_run_names_its_exit_status_and_the_last_30_lines_of_its_log(tmp_path, monkeypatch):
    import sys

    from sc_tune.synthetic import pipeline

    script = "import sys\nfor i in range(40): print('line', i)\nsys.exit(3)"
    monkeypatch.setattr(pipeline, "sc_tune_command", lambda *args: [sys.executable, "-c", script])
    with pytest.raises(RuntimeError) as failed:
        pipeline.run_sc_tune("model", "data", tmp_path / "out", 0, 1)
    message = str(failed.value)
    log = tmp_path / "out" / "finetune.log"
    assert message.startswith(f"finetune.py failed with exit code 3; last lines of {log}:")
    assert message.split("finetune.log:\n", 1)[1] == "".join(f"line {i}\n" for i in range(10, 40))
    ok = "import os, sys\nos.makedirs(os.path.join(sys.argv[1], 'checkpoint-4'))"
    monkeypatch.setattr(pipeline, "sc_tune_command",
                        lambda model, data, out, *args: [sys.executable, "-c", ok, str(out)])
    started = time.perf_counter()
    checkpoint, seconds = pipeline.run_sc_tune("model", "data", tmp_path / "runs" / "again", 0, 1)
    assert checkpoint == tmp_path / "runs" / "again" / "checkpoint-4" and 0 < seconds <= time.perf_counter() - started
    # Run again into the same folder (the benchmark's reruns): the folder is reused.
    ok_again = "import os, sys\nos.makedirs(os.path.join(sys.argv[1], 'checkpoint-5'))"
    monkeypatch.setattr(pipeline, "sc_tune_command",
                        lambda model, data, out, *args: [sys.executable, "-c", ok_again, str(out)])
    assert pipeline.run_sc_tune("model", "data", tmp_path / "runs" / "again", 0, 1)[0].name == "checkpoint-5"


def test_the_picture_shows_ambiguous_objects_first_in_data_order():
    from sc_tune.synthetic.pipeline import pick_figure_rows

    before = [{"i": i, "ambiguous": i % 3 == 0} for i in range(12)]
    after = [{"i": i} for i in range(12)]
    picked_before, picked_after = pick_figure_rows(before, after)
    assert [r["i"] for r in picked_before] == [0, 3, 6, 9, 1, 2, 4, 5] == [r["i"] for r in picked_after]


def test_the_data_is_written_once_for_its_sizes(tmp_path):
    from sc_tune.synthetic.pipeline import make_data

    first = make_data(tmp_path, 1, 3, 2)
    stamp = (tmp_path / "heldout.json").stat().st_mtime_ns
    assert make_data(tmp_path, 1, 3, 2) == first and (tmp_path / "heldout.json").stat().st_mtime_ns == stamp
    for seed, train, held_out in ((2, 3, 2), (1, 4, 2), (1, 3, 3)):  # another seed or size: written again
        make_data(tmp_path, seed, train, held_out)
        summary = json.loads((tmp_path / "dataset.json").read_text())
        assert (summary["seed"], summary["train"]["images"], summary["heldout"]["images"]) == (seed, train, held_out)


def test_the_ablations_switch_off_what_they_are_named_after():
    from sc_tune.synthetic.pipeline import ABLATIONS, VARIANTS

    assert ABLATIONS == ("sc_tune", "no_kl", "no_locator") and VARIANTS["sc_tune"] == {}
    assert float(VARIANTS["no_kl"]["kl_coef"]) == 0.0
    assert int(VARIANTS["no_locator"]["locator_update_steps"]) == 0
    assert VARIANTS["no_baseline"] == {"describer_baseline": "none"}


def test_a_checkpoint_is_evaluated_without_figure_rows_unless_asked_and_timed(tiny_warm_start):
    from sc_tune.synthetic.pipeline import evaluate_checkpoint

    root, _ = tiny_warm_start
    started = time.perf_counter()
    metrics = evaluate_checkpoint(root / "last", root / "eval_data", limit=2)
    assert metrics["rows"] == [] and 0 < metrics["eval_seconds"] <= time.perf_counter() - started
    assert len(evaluate_checkpoint(root / "last", root / "eval_data", limit=2, keep_rows=1)["rows"]) == 1


def test_the_quick_start_picture_puts_four_pairs_on_a_line(tmp_path):
    from PIL import Image

    image_path = tmp_path / "im.png"
    Image.new("RGB", (128, 128), (200, 200, 200)).save(image_path)
    row = {"image": str(image_path), "bbox": [0.1, 0.1, 0.4, 0.4], "caption": "c", "pred": None, "iou": 0.0}
    with Image.open(before_after_grid([row] * 8, [row] * 8, tmp_path / "g.png")) as grid:
        assert grid.width == 8 * (256 + 6) + 6  # 4 (before, after) pairs of 256-px tiles
