"""evaluate.py as a command: its flags' bounds, what it reads from the command line, what it logs, prints and draws,
and how it lists unreadable images. The scored runs use the scripted model of ``test_eval_pipeline`` (known
answers, so known metrics) in place of the loaded weights."""

import json
import logging
import sys
import time

import pytest
from PIL import Image

from tests.test_eval_pipeline import SC_CASES, ScriptedVLM, make_adapter, scripted_cycle_model

REQUIRED = ["--model_name_or_path", "m", "--data_path", "a.json", "--output_dir", "o"]


def _parse(*argv, task="self-consistency"):
    import evaluate

    return evaluate.parse_args(["--task", task, *REQUIRED, *argv])


@pytest.mark.parametrize("flag, refusal", [
    ("per_device_eval_batch_size", "--per_device_eval_batch_size 0 must be >= 1"),
    ("describer_max_new_tokens", "--describer_max_new_tokens 0 must be >= 1"),
    ("locator_max_new_tokens", "--locator_max_new_tokens 0 must be >= 1"),
    ("max_samples", "--max_samples 0 must be >= 1 (leave it out to evaluate every record): metrics over no sample "
                    "mean nothing"),
])
def test_counts_are_accepted_from_1_and_refused_below(flag, refusal):
    assert getattr(_parse(f"--{flag}", "1"), flag) == 1
    with pytest.raises(ValueError) as refused:
        _parse(f"--{flag}", "0")
    assert str(refused.value) == refusal


def test_the_shortest_caption_may_be_0_or_the_longest_and_nothing_outside():
    assert _parse("--describer_min_new_tokens", "0").describer_min_new_tokens == 0
    assert _parse("--describer_min_new_tokens", "7", "--describer_max_new_tokens", "7").describer_min_new_tokens == 7
    for value in ("-1", "8"):
        with pytest.raises(ValueError, match=rf"^--describer_min_new_tokens {value} must be in \[0, "
                                             r"--describer_max_new_tokens 7\]$"):
            _parse("--describer_min_new_tokens", value, "--describer_max_new_tokens", "7")


def test_one_data_file_per_task_but_rec():
    import evaluate

    two = ["--model_name_or_path", "m", "--output_dir", "o", "--data_path", "a.jsonl", "b.jsonl"]
    assert evaluate.parse_args(["--task", "rec", *two]).data_path == ["a.jsonl", "b.jsonl"]
    for task in ("self-consistency", "region-caption"):
        with pytest.raises(ValueError, match=f"^--task {task} takes one --data_path file, got 2$"):
            evaluate.parse_args(["--task", task, *two])


def test_the_command_line_is_read_after_the_script_name_in_either_form(monkeypatch):
    import evaluate

    monkeypatch.setattr(sys, "argv", ["evaluate.py", "rec", *REQUIRED, "--per_device_eval_batch_size", "3"])
    args = evaluate.parse_args()
    assert (args.task, args.model_name_or_path, args.per_device_eval_batch_size) == ("rec", "m", 3)


def test_help_opens_with_what_the_command_does(capsys):
    import evaluate

    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: ") and "--task TASK --model_name_or_path CKPT" in lines[0]
    description = next(line for line in lines[1:] if line.strip())
    assert description == ("Evaluate a VLM or an SC-Tune checkpoint: self-consistency, REC (RefCOCO/+/g) and region "
                           "captioning.")


@pytest.fixture
def images(tmp_path):
    """The scripted model's images, in a folder whose name is not ASCII (printed as written)."""
    root = tmp_path / "bilder_ü"
    root.mkdir()
    Image.new("RGB", (80, 60), (200, 40, 40)).save(root / "red.png")
    Image.new("RGB", (80, 60), (40, 40, 200)).save(root / "blue.png")
    return root


def _scripted(monkeypatch, model, adapter):
    import evaluate

    monkeypatch.setattr(evaluate, "load_model_and_adapter", lambda *args, **kwargs: (model, adapter))


def test_a_rec_run_logs_prints_and_times_what_it_wrote(monkeypatch, tiny_checkpoint, images, tmp_path, capsys, caplog):
    """Two REC files: one scored 1/3 (a hit, an IoU of 1/3, no box), one where nothing parses (0, logged as 0)."""
    import evaluate

    adapter = make_adapter("qwen2_vl")
    image = adapter.prepare_image(Image.open(images / "blue.png"))
    _scripted(monkeypatch, ScriptedVLM(adapter, {
        "alpha thing": adapter.locator_target([0.25, 0.5, 0.75, 1.0], image, "alpha thing"),
        "beta thing": adapter.locator_target([0.0, 0.0, 0.5, 0.5], image, "beta thing"),
    }), adapter)
    refs, none = tmp_path / "refs.jsonl", tmp_path / "none.jsonl"
    refs.write_text("".join(json.dumps({"image": "blue.png", "sent": sent, "bbox": box, "width": 80, "height": 60})
                            + "\n" for sent, box in (("alpha thing", [20, 30, 60, 60]), ("beta thing", [20, 0, 60, 30]),
                                                     ("gamma thing", [0, 0, 80, 60]))))
    none.write_text(json.dumps({"image": "red.png", "sent": "gamma", "bbox": [0, 0, 8, 8], "width": 80,
                                "height": 60}) + "\n")
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="evaluate")
    capsys.readouterr()
    started = time.monotonic()
    evaluate.main(["--task", "rec", "--model_name_or_path", tiny_checkpoint("qwen2_vl"), "--data_path", str(refs),
                   str(none), "--image_folder", str(images), "--output_dir", str(out),
                   "--per_device_eval_batch_size", "2"])
    elapsed = time.monotonic() - started
    written = json.loads((out / "rec_metrics.json").read_text(encoding="utf-8"))
    assert written["results"]["refs"]["acc@0.5"] == pytest.approx(1 / 3)
    assert written["results"]["none"]["acc@0.5"] == 0.0
    logged = [r.getMessage() for r in caplog.records if r.name == "evaluate" and "Acc@0.5" in r.getMessage()]
    assert logged == ["rec_refs: Acc@0.5 0.3333 over 3 samples (1 parse failures)",
                      "rec_none: Acc@0.5 0.0000 over 1 samples (1 parse failures)"]
    # The metrics as written, printed last for the log: indented, the folder's name as written (before them,
    # DeepSpeed's accelerator line where this process imported it first).
    printed = capsys.readouterr().out
    assert ("\n" + printed).endswith("\n" + json.dumps(written, indent=2, ensure_ascii=False) + "\n")
    assert "bilder_ü" in printed
    # The scoring's own time, to the hundredth of a second.
    assert 0 <= written["seconds"] <= elapsed and written["seconds"] == round(written["seconds"], 2)


@pytest.mark.parametrize("grid_samples", [0, 1])
def test_the_cycle_grid_is_drawn_from_one_sample_and_not_at_0(monkeypatch, tiny_checkpoint, images, tmp_path,
                                                                grid_samples):
    import evaluate

    adapter = make_adapter("qwen2_vl")
    _scripted(monkeypatch, scripted_cycle_model(adapter, images), adapter)
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps([{"image": "red.png", "bbox": box} for box, _, _ in SC_CASES]))
    out = tmp_path / "out"
    evaluate.main(["--task", "self-consistency", "--model_name_or_path", tiny_checkpoint("qwen2_vl"), "--data_path",
                   str(data), "--image_folder", str(images), "--output_dir", str(out), "--grid_samples",
                   str(grid_samples)])
    metrics = json.loads((out / "self_consistency_metrics.json").read_text())["metrics"]
    assert metrics["acc@0.5"] == pytest.approx(2 / 5)
    assert (out / "self_consistency_cycles.png").exists() == (grid_samples == 1)


@pytest.mark.parametrize("missing", [10, 11])
def test_unreadable_images_are_listed_ten_at_most_before_any_scoring(monkeypatch, tiny_checkpoint, images, tmp_path,
                                                                      missing):
    import evaluate

    adapter = make_adapter("qwen2_vl")
    model = ScriptedVLM(adapter, {})
    _scripted(monkeypatch, model, adapter)
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps([{"image": f"gone_{i}.png", "bbox": [0, 0, 1, 1]} for i in range(missing)]
                               + [{"image": "red.png", "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--task", "self-consistency", "--model_name_or_path", tiny_checkpoint("qwen2_vl"),
                       "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(tmp_path / "out")])
    message = str(stopped.value.code)
    assert message.startswith(f"{data}: {missing} sample(s) with an unreadable image under --image_folder "
                              f"{str(images)!r}: record 0: gone_0.png: ")
    assert [f"record {i}: gone_{i}.png" in message for i in range(missing)] == [i < 10 for i in range(missing)]
    assert message.endswith(" (--skip_unreadable_images leaves them out and lists them in the metrics file)")
    assert ("; ... (--skip" in message) == (missing > 10)
    assert model.prompts == []  # nothing scored
