"""The preflight stops a run whose locator cannot parse, before step 0, and lets a grounding model through."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sc_tune.data import ReferringDataset
from sc_tune.preflight import (
    PreflightError,
    PreflightReport,
    RoleCheck,
    referring_text,
    run_preflight,
    spread_indices,
)
from sc_tune.rollout import GenerationSettings
from tests.conftest import ROOT, SAMPLE_DATA, SAMPLE_IMAGES

WARM_START = os.path.join(ROOT, "checkpoints", "warm_start")


def args(model: str, data: str, images: str, out, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model, "--data_path", data, "--image_folder", images, "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "4", "--describer_max_new_tokens", "6",
        "--use_cpu", "True", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
        "--preflight_samples", "8", *extra,
    ]  # fmt: skip


def test_a_locator_that_cannot_parse_stops_before_step_0(tiny_checkpoint, tmp_path):
    import finetune

    # finetune.py's command in this process (a subprocess would spend seconds importing torch and transformers
    # again; the two-process run below goes through the real command line): the exit it ends in.
    with pytest.raises(SystemExit) as stopped:
        finetune.cli(args(tiny_checkpoint("qwen3_vl"), SAMPLE_DATA, SAMPLE_IMAGES, tmp_path / "out"))
    message = stopped.value.code
    assert isinstance(message, str) and "\n" not in message  # Python prints it as the one line, exit status 1
    assert message.startswith("finetune.py: error: preflight on 8 samples")
    assert "cycle: parse failures" in message and "Likely cause:" in message
    assert "docs/grounding_warm_start.md" in message and "--skip_preflight" in message
    assert not any(name.startswith("checkpoint-") for name in os.listdir(tmp_path / "out"))


def test_skip_preflight_trains_anyway(tiny_checkpoint, tmp_path):
    import finetune

    trainer = finetune.main(args(tiny_checkpoint("qwen3_vl"), SAMPLE_DATA, SAMPLE_IMAGES, tmp_path / "o",
                                 "--skip_preflight", "True"))
    assert trainer.state.global_step == 1


def test_a_grounding_model_passes_and_reports_both_checks(tmp_path, capsys):
    import finetune
    from sc_tune.synthetic.shapes import write_dataset

    write_dataset(tmp_path / "shapes", seed=3, train_images=4, heldout_images=1)
    trainer = finetune.main(args(WARM_START, str(tmp_path / "shapes" / "train.json"), str(tmp_path / "shapes"),
                                 tmp_path / "o", "--describer_max_new_tokens", "8", "--describer_min_new_tokens", "1"))
    assert trainer.state.global_step == 1
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("preflight on"))
    assert "cycle: parse failures 0/8" in summary and "REC: parse failures 0/8" in summary  # captions in the data


def _check(finished: list[bool], boxes) -> RoleCheck:
    return RoleCheck("cycle", ["{\"bbox_2d\": [1, 2"] * len(boxes), boxes, ["no box"] * len(boxes), finished,
                     [0.0] * len(boxes))


def test_the_message_names_the_cause():
    cut = PreflightReport([_check([False] * 4, [None] * 4)], budget=20, grounding_prior=True)
    assert "format: the answers hold no box" in cut.failure(0.5)  # cut, but more tokens would not help
    assert "(they ran to the 20-token budget)" in cut.failure(0.5)
    cut.checks[0].parse_with_more, cut.checks[0].tokens_needed = [0, 1, 2], 33
    assert "budget: 4 of the 4 failed answers were cut at the 20-token budget" in cut.failure(0.5)
    assert "--locator_max_new_tokens 33 or more" in cut.failure(0.5)
    unparsed = PreflightReport([_check([True] * 4, [None, None, None, [0, 0, 1, 1]])], 40, grounding_prior=False)
    message = unparsed.failure(0.5)
    assert "format:" in message and "no grounding prior" in message and "budget:" not in message
    assert unparsed.failure(0.8) is None  # 75 % failures under an 80 % limit
    with pytest.raises(PreflightError):
        raise PreflightError(message)


def test_captions_that_derail_the_locator_are_named_as_the_cause():
    """The records' captions ground, the model's own do not: the captions are the cause, not the locator's format
    or a missing grounding prior (the README's dry run at the reference's caption minimum of 3 words)."""
    cycle = _check([True] * 4, [None, None, None, [0, 0, 1, 1]])
    cycle.texts = ["the circle red"] * 4
    rec = RoleCheck("REC", ["ok"] * 4, [[0, 0, 1, 1]] * 4, [None] * 4, [True] * 4, [1.0] * 4)
    message = PreflightReport([cycle, rec], 40, grounding_prior=True).failure(0.5)
    assert "the model's captions derail its locator" in message and "'the circle red' -> " in message
    assert "--describer_min_new_tokens" in message and "REC: 0 % parse failures" in message
    assert "format:" not in message and "grounding warm start" not in message
    rec.boxes = [None, None, None, [0, 0, 1, 1]]  # neither grounds: the locator's own format is the cause again
    assert "format:" in PreflightReport([cycle, rec], 40, grounding_prior=True).failure(0.5)


# ---------------------------------------------------------------- causes provoked with real generation
CAPTIONS, BOXES = GenerationSettings(8, 1), GenerationSettings(20, 3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A few synthetic shapes images (the warm start's domain); records carry a caption (REC)."""
    from sc_tune.synthetic.shapes import write_split

    root = tmp_path_factory.mktemp("shapes")
    write_split(root, "train", 6, seed=0)
    return str(root / "train.json"), str(root)


@pytest.fixture(scope="module")
def warm_start():
    from sc_tune.modeling import load_model_and_adapter

    model, adapter = load_model_and_adapter(WARM_START)
    return model.eval(), adapter


def _preflight(model, adapter, records, image_folder, count, box_settings=BOXES):
    """``run_preflight`` on ``count`` records spread over ``records``, as the trainer picks them."""
    dataset = ReferringDataset(records, image_folder)
    indices = spread_indices(len(dataset), count)
    items = [dataset[i] for i in indices]
    captions = [referring_text(records[i]) for i in indices]
    return run_preflight(model, adapter, [adapter.prepare_image(it["image"]) for it in items],
                         [list(it["bbox"]) for it in items], captions if all(captions) else None, CAPTIONS,
                         box_settings)  # fmt: skip


def test_answers_cut_at_the_budget_name_the_budget_and_the_tokens_needed(warm_start, shapes, monkeypatch):
    """The warm start's answers need 25 to 45 tokens; with the budget not fitted to the family's widest answer
    and set to 12, every answer is cut: generated again with 4x the tokens they parse, and the message says so."""
    import sc_tune.preflight

    model, adapter = warm_start
    monkeypatch.setattr(sc_tune.preflight, "fit_locator_budget", lambda adapter, images, settings: settings)
    data, images = shapes
    report = _preflight(model, adapter, json.load(open(data)), images, 8, GenerationSettings(12, 3))
    rec = report.checks[-1]
    assert rec.name == "REC" and not any(rec.finished) and all(b is None for b in rec.boxes)
    assert len(rec.parse_with_more) >= 5 and 12 < rec.tokens_needed <= 48
    message = report.failure(0.5, 0.05)
    assert "budget: 8 of the 8 failed answers were cut at the 12-token budget" in message
    assert f"--locator_max_new_tokens {report.checks[0].tokens_needed} or more" in message


def test_boxes_that_parse_but_miss_stop_as_no_grounding_prior(warm_start, shapes):
    """Every record's box replaced by a sliver in the image's corner, where no shape is drawn: the warm start's
    boxes parse (they find the captioned shape), and none can reach IoU 0.5 with the record's box."""
    model, adapter = warm_start
    data, images = shapes
    records = json.load(open(data))
    assert _preflight(model, adapter, records, images, 16).failure(0.5, 0.05) is None  # the true boxes pass
    for r in records:
        r["bbox"] = [0.0, 0.0, 0.03, 0.03]
    report = _preflight(model, adapter, records, images, 16)
    assert max(c.parse_failure_rate for c in report.checks) <= 0.25
    assert max(c.acc50 for c in report.checks) < 0.05, report.summary()
    message = report.failure(0.5, 0.05)
    assert "The answers parse, but Acc@0.5 is" in message and "Likely cause: no grounding prior" in message
    assert report.failure(0.5, 0.0) is None  # --preflight_min_accuracy 0 lets it through


def test_a_family_without_grounding_prior_is_named_as_the_cause(tiny_checkpoint):
    from sc_tune.modeling import load_model_and_adapter

    model, adapter = load_model_and_adapter(tiny_checkpoint("smolvlm"))
    assert adapter.grounding_prior is False
    report = _preflight(model.eval(), adapter, json.load(open(SAMPLE_DATA)), SAMPLE_IMAGES, 4)
    assert [c.name for c in report.checks] == ["cycle"]  # the sample data carries no captions
    message = report.failure(0.5, 0.05)
    assert "Likely cause: no grounding prior" in message and "grounding warm start" in message


def test_a_resumed_run_runs_no_preflight(tiny_checkpoint, tmp_path):
    import finetune

    model, out = tiny_checkpoint("qwen3_vl"), tmp_path / "run"
    steps = ("--save_strategy", "steps", "--save_steps", "1", "--describer_update_steps", "1")
    finetune.main(args(model, SAMPLE_DATA, SAMPLE_IMAGES, out, *steps, "--skip_preflight", "True"))
    resumed = args(model, SAMPLE_DATA, SAMPLE_IMAGES, out, *steps, "--resume_from_checkpoint", "True")
    resumed[resumed.index("--max_steps") + 1] = "2"
    assert finetune.main(resumed).state.global_step == 2  # a random model: a preflight would have stopped it


def test_the_documented_warm_start_recipe_trains_the_locator_only(tiny_checkpoint, tmp_path):
    """docs/grounding_warm_start.md: --describer_update_steps 0 makes every step a locator step."""
    import finetune

    argv = args(tiny_checkpoint("qwen3_vl"), SAMPLE_DATA, SAMPLE_IMAGES, tmp_path / "run", "--skip_preflight",
                "True", "--describer_update_steps", "0", "--locator_update_steps", "2")  # fmt: skip
    argv[argv.index("--max_steps") + 1] = "2"
    trainer = finetune.main(argv)
    assert [h["phase"] for h in trainer.state.log_history if "loss" in h] == ["locator", "locator"]
    doc = open(os.path.join(ROOT, "docs", "grounding_warm_start.md")).read()
    assert "--describer_update_steps 0 --locator_update_steps" in doc and "--skip_preflight True" in doc


def test_samples_spread_and_referring_texts():
    assert spread_indices(32, 4) == [0, 8, 16, 24] and spread_indices(3, 16) == [0, 1, 2]
    assert referring_text({"caption": " the red circle "}) == "the red circle"
    assert referring_text({"category": "dog"}) == "dog"
    assert referring_text({"category_id": 3, "category": 3}) is None  # Objects365 ids: the model's own caption


@pytest.mark.slow  # two processes
def test_every_rank_stops_together_under_torchrun(tiny_checkpoint, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29733",
               os.path.join(ROOT, "finetune.py"),
               *args(tiny_checkpoint("qwen3_vl"), SAMPLE_DATA, SAMPLE_IMAGES, tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("finetune.py: error: preflight on 8 samples") == 2  # both ranks, the same verdict
    assert done.stdout.count("preflight on 8 samples") == 1  # rank 0 reports
