"""The preflight stops a run whose locator cannot parse, before step 0, and lets a grounding model through."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sc_tune.preflight import PreflightError, PreflightReport, RoleCheck
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
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "finetune.py"),
         *args(tiny_checkpoint("qwen3_vl"), SAMPLE_DATA, SAMPLE_IMAGES, tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("finetune.py: error: preflight on 8 samples")
    assert "cycle: parse failures" in message and "Likely cause:" in message
    assert "docs/grounding_warm_start.md" in message and "--skip_preflight" in message
    assert "Traceback" not in done.stderr
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
    assert "budget: 4 of the 4 failed answers were cut at the 20-token budget" in cut.failure(0.5)
    unparsed = PreflightReport([_check([True] * 4, [None, None, None, [0, 0, 1, 1]])], 40, grounding_prior=False)
    message = unparsed.failure(0.5)
    assert "format:" in message and "no grounding prior" in message and "budget:" not in message
    assert unparsed.failure(0.8) is None  # 75 % failures under an 80 % limit
    with pytest.raises(PreflightError):
        raise PreflightError(message)
