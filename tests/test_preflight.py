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
from tests.helpers import run_launch

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


def test_rates_count_every_sample_and_the_limits_are_inclusive():
    one = RoleCheck("cycle", ["no"], [None], ["no box"], [True], [0.0])
    assert one.parse_failure_rate == 1.0 and one.acc50 == 0.0  # one sample: its failure is the whole rate
    mixed = RoleCheck("REC", ["a"] * 4, [[0, 0, 1, 1]] * 4, [None] * 4, [True] * 4, [0.9, 0.2, 0.5, 0.1])
    assert mixed.acc50 == 0.5 and mixed.parse_failure_rate == 0.0  # IoU 0.5 counts as a hit
    failing = PreflightReport([_check([True] * 4, [None, None, None, [0, 0, 1, 1]])], 40, grounding_prior=True)
    assert failing.failure(0.75) is None and failing.failure(0.74) is not None  # at the limit: let through
    assert "The cycle answers of 75 % of the samples do not parse" in failing.failure(0.74)
    assert PreflightReport([failing.checks[0], mixed], 40, True).summary() == (
        "preflight on 4 samples, locator budget 40 tokens: cycle: parse failures 3/4 (75 %), Acc@0.5 0.0 %; "
        "REC: parse failures 0/4 (0 %), Acc@0.5 50.0 %")
    assert PreflightReport([mixed], 40, True).failure(0.0, 0.5) is None  # Acc@0.5 at the limit: let through
    assert "Acc@0.5 is 50.0 % at best" in PreflightReport([mixed], 40, True).failure(0.0, 0.51)


def test_a_run_passes_when_any_check_grounds_and_the_message_quotes_the_best():
    """"Acc@0.5 below --preflight_min_accuracy in every check": the REC check grounding is enough."""
    cycle = RoleCheck("cycle", ["a"] * 4, [[0, 0, 1, 1]] * 4, [None] * 4, [True] * 4, [0.0, 0.0, 0.0, 0.6])
    rec = RoleCheck("REC", ["a"] * 4, [[0, 0, 1, 1]] * 4, [None] * 4, [True] * 4, [0.9, 0.8, 0.7, 0.1])
    assert PreflightReport([cycle, rec], 40, True).failure(0.0, 0.5) is None
    assert PreflightReport([rec, cycle], 40, True).failure(0.0, 0.5) is None
    message = PreflightReport([cycle, rec], 40, True).failure(0.0, 0.9)
    assert "Acc@0.5 is 75.0 % at best" in message  # the REC check's, not the cycle's 25 %


def test_the_cause_is_the_budget_only_when_most_cut_answers_parse_with_more_tokens():
    """Of 4 failed answers, 3 parsing with 4x the tokens is "most" (the budget); 2 is not. The example quoted is the
    first failed answer."""
    def report(parse_with_more, with_rec):
        cycle = _check([False] * 4, [None] * 4)
        cycle.answers = ["first", "second", "third", "fourth"]
        cycle.parse_with_more, cycle.tokens_needed = parse_with_more, 33
        cycle.texts = ["t1", "t2", "t3", "t4"]  # the captions the answers located
        cycle.reasons = ["no number", "no bracket", "no end", "no box"]
        # the records' captions ground at the limit: 3 of 4 fail to parse, as --preflight_max_parse_failures 0.75
        rec = RoleCheck("REC", ["ok"] * 4, [None] * 3 + [[0, 0, 1, 1]], [None] * 4, [True] * 4, [1.0] * 4)
        return PreflightReport([cycle, rec] if with_rec else [cycle], 20, True).failure(0.75)

    for with_rec in (False, True):
        assert "budget: 4 of the 4 failed answers" in report([0, 1, 2], with_rec)
        assert "(e.g. 'first')" in report([0, 1, 2], with_rec)
    assert "format:" in report([0, 1], with_rec=False) and "budget:" not in report([0, 1], with_rec=False)
    assert "(e.g. 'first': no number)" in report([0, 1], with_rec=False)  # the first failed answer's reason
    half = report([0, 1], with_rec=True)  # the records' captions ground: the model's captions are the cause
    assert "the model's captions derail its locator" in half and "budget:" not in half and "'first'" in half
    assert "REC: 75 % parse failures" in half and "e.g. 't1' -> 'first'" in half


@pytest.mark.parametrize("model_type", ["qwen", "qwen2_vl"])
def test_the_locator_check_reads_the_familys_answers_and_probes_only_the_cut_ones(tiny_checkpoint, monkeypatch,
                                                                                   model_type):
    """The model made to write (ScriptedLogits) its family's own answer in row 0, an answer without a box in row 1,
    and its answer after 10 and 30 filler tokens in rows 2 and 3, at a budget only row 0's answer fits: the box reads
    back (Qwen2-VL's answer is in special tokens, ``<|box_start|>``: read as the describer's text, without them and
    with them suppressed, no box parses), the rows that end unparsed score IoU 0, and only the two cut rows are
    generated again, with 4x the tokens, where they parse; the budget named is the longer one's."""
    import sc_tune.preflight
    from sc_tune.modeling import load_model_and_adapter
    from tests.helpers import FORCED_BOXES, ScriptedLogits, two_colour_photo

    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    images = [adapter.prepare_image(two_colour_photo((97, 61)))] * 4
    box, caption = FORCED_BOXES[0], "the red square"
    answer = adapter.encode_target(adapter.locator_target(box, images[0], caption))
    end = adapter.end_token_ids[:1]
    filler = adapter.encode_target(" and then some more words" * 8)
    scripts = [answer, adapter.encode_target("somewhere on the left") + end, filler[:10] + answer,
               filler[:30] + answer]  # fmt: skip
    assert len(filler) >= 30 and len(scripts[1]) < len(answer) + 2 < len(scripts[2]) < len(scripts[3]) <= 4 * (
        len(answer) + 2)
    generate, rows_per_call = sc_tune.preflight.generate, []

    def scripted(model, adapter, batch, settings, **kwargs):  # each call writes its own rows' scripts
        rows_per_call.append(len(batch.inputs["input_ids"]))  # ScriptedLogits refuses a call of other rows
        forcing.write([scripts[r] for r in ([0, 1, 2, 3] if len(rows_per_call) == 1 else [2, 3])])
        return generate(model, adapter, batch, settings, **kwargs)

    monkeypatch.setattr(sc_tune.preflight, "generate", scripted)
    with ScriptedLogits(model.eval()) as forcing:
        check = sc_tune.preflight._locate_check("cycle", model, adapter, images, [caption] * 4, [box] * 4,
                                                GenerationSettings(len(answer) + 2, 1))
    assert rows_per_call == [4, 2]  # the probe: the two cut rows alone
    step = 1.0 / min(adapter.codec.axis_scales(images[0].frame))
    assert check.boxes[0] == pytest.approx(box, abs=step) and check.boxes[1:] == [None] * 3
    assert check.finished == [True, True, False, False] and check.texts == [caption] * 4
    assert check.ious[0] > 0.95 and check.ious[1:] == [0.0] * 3
    assert check.lengths == [len(answer), len(scripts[1]), len(answer) + 2, len(answer) + 2]
    assert check.parse_with_more == [2, 3] and check.tokens_needed == len(scripts[3])
    message = PreflightReport([check], len(answer) + 2, True).failure(0.5)
    assert "budget: 2 of the 3 failed answers were cut" in message
    assert f"--locator_max_new_tokens {len(scripts[3])} or more" in message


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
    done = run_launch(command, 300, cwd=ROOT, env=env)
    assert done.returncode != 0
    assert done.stderr.count("finetune.py: error: preflight on 8 samples") == 2  # both ranks, the same verdict
    assert done.stdout.count("preflight on 8 samples") == 1  # rank 0 reports


DECIDE = r"""
import os, sys
from types import SimpleNamespace

rank, port, root, passing_rank = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, root)
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
from accelerate import PartialState

PartialState(cpu=True)
from sc_tune.preflight import PreflightReport, RoleCheck, decide

ious = [1.0] * 4 if rank == passing_rank else [0.0] * 4  # the ranks' greedy answers differ (a last bit on a GPU)
check = RoleCheck("cycle", ["a"] * 4, [[0, 0, 1, 1]] * 4, [None] * 4, [True] * 4, ious)
verdict = decide(PreflightReport([check], 40, True), SimpleNamespace(preflight_max_parse_failures=0.5,
                                                                     preflight_min_accuracy=0.5), 2)
print("stop" if verdict else "train", flush=True)
"""


def test_every_rank_acts_on_rank_0s_verdict_where_their_checks_differ():
    """Rank 0's check fails and rank 1's passes: both stop (a rank that trained on would wait at its first
    collective for a rank 0 that has stopped)."""
    from tests.helpers import free_port

    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", DECIDE, str(rank), port, ROOT, "1"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [r.communicate(timeout=120) for r in ranks]
    assert [out.strip() for out, _ in outputs] == ["stop", "stop"], outputs
