"""The preflight before step 0 (sc_tune.preflight): a locator that cannot ground stops the run, naming the cause.

A random tiny model's boxes never parse, so it must stop; the committed warm start (``checkpoints/warm_start``,
whose locator writes parseable boxes on the synthetic shapes) must pass and report its rates. The causes
(budget, format, no grounding prior) are provoked with real generation on the warm start and the tiny models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sc_tune.data import ReferringDataset
from sc_tune.preflight import PreflightError, PreflightReport, referring_text, run_preflight, stop_message
from sc_tune.rollout import GenerationSettings
from tests.conftest import ROOT, SAMPLE_DATA, SAMPLE_IMAGES

WARM_START = os.path.join(ROOT, "checkpoints", "warm_start")
CAPTIONS, BOXES = GenerationSettings(8, 1), GenerationSettings(20, 3)


def run_args(model: str, data: str, images: str, output_dir, *extra: str) -> list[str]:
    return [
        *("--model_name_or_path", model, "--data_path", data, "--image_folder", images, "--output_dir", str(output_dir)),
        *("--max_steps", "1", "--describer_update_steps", "1", "--locator_update_steps", "1", "--ppo_epochs", "1"),
        *("--per_device_train_batch_size", "4", "--describer_max_new_tokens", "6", "--locator_max_new_tokens", "8"),
        *("--use_cpu", "True", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"),
        *("--dataloader_num_workers", "0", "--preflight_samples", "8", *extra),
    ]


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


def test_a_random_model_stops_before_step_0_and_skip_preflight_trains(tiny_checkpoint, tmp_path, capsys):
    import finetune

    model = tiny_checkpoint("qwen2_vl")
    out = tmp_path / "run"
    with pytest.raises(PreflightError) as stopped:
        finetune.main(run_args(model, SAMPLE_DATA, SAMPLE_IMAGES, out))
    message = str(stopped.value)
    assert "8 of 8 locator answers did not parse" in message and "Likely cause: format" in message
    assert "(e.g. '" in message  # one answer quoted
    assert "docs/grounding_warm_start.md" in message and "--skip_preflight True" in message
    assert "preflight on 8 samples: parse failures 100.0%" in capsys.readouterr().out
    assert not (out / "trainer_state.json").exists()  # stopped before step 0: nothing trained, nothing saved
    # The same output folder takes the run again (nothing there counts as another run), past the preflight.
    trainer = finetune.main(run_args(model, SAMPLE_DATA, SAMPLE_IMAGES, out, "--skip_preflight", "True"))
    assert trainer.state.global_step == 1
    assert "preflight" not in capsys.readouterr().out


def test_the_warm_start_passes_and_reports_its_rates(shapes, tmp_path, capsys):
    import finetune

    data, images = shapes
    trainer = finetune.main(run_args(WARM_START, data, images, tmp_path / "run"))
    assert trainer.state.global_step == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("preflight on 8 samples"))
    failures = float(line.split("parse failures ")[1].split("%")[0])
    rec = float(line.split("REC Acc@0.5 ")[1].split("%")[0])
    assert failures <= 50 and rec >= 50, line  # its boxes parse and follow the captions (about 94 % REC)


def test_a_resumed_run_runs_no_preflight(tiny_checkpoint, tmp_path):
    import finetune

    model, out = tiny_checkpoint("qwen2_vl"), tmp_path / "run"
    steps = ("--save_strategy", "steps", "--save_steps", "1")
    finetune.main(run_args(model, SAMPLE_DATA, SAMPLE_IMAGES, out, *steps, "--skip_preflight", "True"))
    resumed = run_args(model, SAMPLE_DATA, SAMPLE_IMAGES, out, *steps, "--resume_from_checkpoint", "True")
    resumed[resumed.index("--max_steps") + 1] = "2"
    assert finetune.main(resumed).state.global_step == 2  # a random model: a preflight would have stopped it


def test_answers_cut_at_the_budget_name_the_budget_and_the_tokens_needed(warm_start, shapes, monkeypatch):
    """The warm start's boxes need ~25 tokens; with the budget not fitted to the family's widest box and set
    to 10, every answer is cut: generated again with 4x the tokens they parse, and the message says so."""
    import sc_tune.rollout

    model, adapter = warm_start
    monkeypatch.setattr(sc_tune.rollout, "fit_locator_budget", lambda adapter, images, settings: settings)
    dataset = ReferringDataset.from_file(*shapes)
    report = run_preflight(model, adapter, dataset, 8, CAPTIONS, GenerationSettings(10, 3), 8)
    assert report.parse_failures == report.cut_at_budget == 8 and report.budget == 10
    assert report.cut_parse_with_more >= 5 and 10 < report.tokens_needed <= 40
    message = stop_message(report, 0.5, 0.05)
    assert "Likely cause: budget: 8 answers used the whole 10-token budget" in message
    assert f"--locator_max_new_tokens {report.tokens_needed} or more" in message


def test_boxes_that_parse_but_miss_stop_as_no_grounding_prior(warm_start, shapes):
    """Every record's box mirrored left-right (the shapes sit in a 4-column grid, so the mirror is another cell):
    the warm start's boxes parse and find the captioned shape, which is now never the record's box."""
    model, adapter = warm_start
    data, images = shapes
    records = json.load(open(data))
    for r in records:
        x1, y1, x2, y2 = r["bbox"]
        r["bbox"] = [1 - x2, y1, 1 - x1, y2]
    report = run_preflight(model, adapter, ReferringDataset(records, images), 16, CAPTIONS, BOXES, 8)
    assert report.parse_failure_rate <= 0.25 and report.rec_samples == 16
    assert report.accuracy < 0.05, report.summary()
    message = stop_message(report, 0.5, 0.05)
    assert "boxes parse but Acc@0.5 is" in message and "Likely cause: no grounding prior" in message
    # The same boxes against the true records pass.
    assert stop_message(run_preflight(model, adapter, ReferringDataset.from_file(*shapes), 16, CAPTIONS, BOXES, 8),
                        0.5, 0.05) is None  # fmt: skip


def test_a_family_without_grounding_prior_is_named_as_the_cause(tiny_checkpoint):
    from sc_tune.modeling import load_model_and_adapter

    model, adapter = load_model_and_adapter(tiny_checkpoint("smolvlm"))
    assert adapter.grounding_prior is False
    dataset = ReferringDataset.from_file(SAMPLE_DATA, SAMPLE_IMAGES)
    report = run_preflight(model.eval(), adapter, dataset, 4, CAPTIONS, BOXES, 4)
    assert report.cycle_samples == 4 and report.rec_samples == 0  # the sample data carries no captions
    message = stop_message(report, 0.5, 0.05)
    assert "Likely cause: no grounding prior" in message and "grounding warm start" in message


def test_thresholds_and_referring_texts():
    report = PreflightReport(samples=4, rec_samples=4, rec_hits=1, parse_failures=2, failed_answers=["x"])
    assert stop_message(report, 0.5, 0.25) is None  # 50 % failures is not above 0.5; 25 % Acc is not below 0.25
    assert "did not parse" in stop_message(report, 0.49, 0.25)
    assert "Acc@0.5 is 25%" in stop_message(report, 0.5, 0.26)
    assert referring_text({"caption": " the red circle "}) == "the red circle"
    assert referring_text({"category": "dog"}) == "dog"
    assert referring_text({"category_id": 3, "category": 3}) is None  # Objects365 ids: the model's own caption


@pytest.mark.slow  # two processes
def test_every_rank_stops_together_under_torchrun(tiny_checkpoint, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29733",
               os.path.join(ROOT, "finetune.py"),
               *run_args(tiny_checkpoint("qwen2_vl"), SAMPLE_DATA, SAMPLE_IMAGES, tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("finetune.py: error: preflight: 8 of 8 locator answers did not parse") == 2
    assert done.stdout.count("preflight on 8 samples") == 1  # rank 0 reports


def test_the_documented_warm_start_recipe_trains_the_locator_only(tiny_checkpoint, tmp_path):
    """docs/grounding_warm_start.md: --describer_update_steps 0 makes every step a locator step."""
    import finetune

    argv = run_args(tiny_checkpoint("qwen2_vl"), SAMPLE_DATA, SAMPLE_IMAGES, tmp_path / "run", "--skip_preflight",
                    "True", "--describer_update_steps", "0", "--locator_update_steps", "2")  # fmt: skip
    argv[argv.index("--max_steps") + 1] = "2"
    trainer = finetune.main(argv)
    assert [h["phase"] for h in trainer.state.log_history if "loss" in h] == ["locator", "locator"]
    doc = open(os.path.join(ROOT, "docs", "grounding_warm_start.md")).read()
    assert "--describer_update_steps 0 --locator_update_steps" in doc and "--skip_preflight True" in doc
