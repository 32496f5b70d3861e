"""``python -m sc_tune.families``: every documented answer form of every family through ``parse``; ``budget``."""

import json
import os
import shutil

import pytest
from PIL import Image

from sc_tune.adapters import families, family_for, supported_model_types
from sc_tune.arguments import SCTuneConfig
from sc_tune.families import main
from sc_tune.rollout import LOCATOR_BUDGET_MARGIN, widest_locator_answer

DOCUMENTED = [(model_type, i) for family in families() for model_type in family.model_types
              for i in range(len(family.adapter.answer_examples))]


def run(capsys, *argv) -> tuple[int, dict | str]:
    capsys.readouterr()  # what earlier steps printed (checkpoint building) is not the command's output
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


@pytest.mark.parametrize("model_type,index", DOCUMENTED)
def test_every_documented_answer_reads_to_its_box_or_is_refused_with_a_reason(capsys, model_type, index):
    example = family_for(model_type).adapter.answer_examples[index]
    code, result = run(capsys, "parse", "--model_type", model_type, "--answer", example.text,
                       "--image_size", *example.frame)
    assert code == 0
    if example.box is None:
        assert result["box"] is None and result["reason"], example.source
    else:
        assert result["box"] == pytest.approx(list(example.box), abs=1e-6), example.source


def test_every_family_documents_its_answers_except_those_with_no_grounding_form():
    undocumented = {f.name for f in families() if not f.adapter.answer_examples}
    # none found upstream (adapter docstrings)
    assert undocumented == {"LLaVA-OneVision", "LLaVA-1.5", "LLaVA-NeXT", "Mistral 3 (Mistral Small 3.1 / 3.2)",
                            "Aya Vision", "Granite 4 Vision", "Llama 3.2 Vision", "Idefics2",
                            "SmolVLM / SmolVLM2 / SmolVLM v1 (Idefics3)", "Ovis2",
                            "MiniCPM-V 4.6", "MiniCPM-V 4.7", "EXAONE 4.5", "HyperCLOVA X SEED Vision v2", "North"}
    for family in families():
        if family.adapter.answer_examples:
            assert any(e.box is not None for e in family.adapter.answer_examples), family.name


def test_a_family_whose_releases_document_no_box_output_has_no_grounding_prior():
    """``grounding_prior`` False makes the preflight ask for a grounding warm start instead of blaming the budget or
    the format: every family with no documented answer form, and Gemma 3, whose box form is Gemini's, assumed
    (Google's reply on the model page says the documentation does not confirm box output)."""
    without_prior = {f.name for f in families() if not f.adapter.grounding_prior}
    undocumented = {f.name for f in families() if not f.adapter.answer_examples}
    assert without_prior == undocumented | {"Gemma 3"}


@pytest.mark.parametrize("model_type", supported_model_types())
def test_the_training_target_round_trips_through_the_command(capsys, model_type, tiny_checkpoint):
    adapter = family_for(model_type).adapter.from_pretrained(tiny_checkpoint(model_type))
    image = adapter.prepare_image(Image.new("RGB", (97, 61)))
    # the second box spans the whole image: each coordinate on the grid's or frame's edge (0 and its scale) is read
    for box in ([0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 1.0, 1.0]):
        target = adapter.locator_target(box, image, "the red circle")
        code, result = run(capsys, "parse", "--model_type", model_type, "--answer", target,
                           "--image_size", *image.frame)
        assert code == 0 and result["box"] == pytest.approx(box, abs=1 / min(image.frame + (999,))), (box, result)


@pytest.mark.parametrize("model_type,answer,words", [
    ("smolvlm", '[{"box_2d": [200, 100, 600, 500], "label": "dog"}]', "y-first"),  # generic: never read x-first
    ("gemma3", "[200, 100, 600, 500]", "axis order"),
    ("gemma4", '{"bbox_2d": [100, 200, 500, 600]}', "x-first"),
    ("qwen3_vl", '{"bbox_2d": [0.1, 0.2, 0.5, 0.6]}', "normalised"),
    ("qwen3_vl", '{"box_2d": [200, 100, 600, 500]}', "y-first"),
    ("glm4v", "<|begin_of_box|>[1, 2, 3, 4], [5, 6, 7, 8]<|end_of_box|>", "2 boxes"),
    ("internvl", "the dog is on the left", "no"),
    # Ovis2.5's documented answer (not Ovis2's: generic codec) and its 0..1 numbers in a list
    ("ovis2", "The <ref>airplane</ref> is found within <box>(0.613,0.085),(0.632,0.107)</box> of the image.",
     "no [x1, y1, x2, y2] box"),
    ("ovis2", "[0.613, 0.085, 0.632, 0.107]", "normalised"),
    ("minicpmv4_6", "<ref>book</ref><box>100 200 500 600</box>", "no"),  # MiniCPM-V 4.5's form, not assumed for 4.6
])
def test_ambiguous_or_absent_boxes_print_null_and_the_reason(capsys, model_type, answer, words):
    code, result = run(capsys, "parse", "--model_type", model_type, "--answer", answer)
    assert code == 0 and result["box"] is None and words in result["reason"], result


def test_pixel_answers_need_the_image_size_and_the_generic_format_is_a_flag(capsys):
    code, err = run(capsys, "parse", "--model_type", "qwen2_5_vl", "--answer", '{"bbox_2d": [1, 2, 3, 4]}')
    assert code == 2 and "--image_size" in err
    code, result = run(capsys, "parse", "--model_type", "qwen2_5_vl", "--answer", "[100, 200, 500, 600]",
                       "--box_format", "generic")
    assert code == 0 and result["box"] == pytest.approx([0.1, 0.2, 0.5, 0.6])
    # a frame with a side of 0 is no frame; 1 x 1 is one
    code, err = run(capsys, "parse", "--model_type", "qwen2_5_vl", "--answer", '{"bbox_2d": [0, 0, 1, 1]}',
                    "--image_size", 0, 100)
    assert code == 2 and "pass --image_size W H" in err
    code, result = run(capsys, "parse", "--model_type", "qwen2_5_vl", "--answer", '{"bbox_2d": [0, 0, 1, 1]}',
                       "--image_size", 1, 1)
    assert code == 0 and result["box"] == [0, 0, 1, 1]
    code, result = run(capsys, "parse", "--model_type", "qwen2_5_vl", "--answer", '{"bbox_2d": [1, 1, 2, 2]}',
                       "--image_size", 3, 3)
    assert code == 0 and result["box"] == [0.333333, 0.333333, 0.666667, 0.666667]  # printed to 6 decimals


def test_budget_of_a_checkpoint_folder(capsys, tiny_checkpoint):
    folder = tiny_checkpoint("qwen3_vl")
    code, report = run(capsys, "budget", "--model_name_or_path", folder, "--image_size", 97, 61)
    assert code == 0 and report["model_type"] == "qwen3_vl" and report["reasoning_only"] is None
    adapter = family_for("qwen3_vl").adapter.from_pretrained(folder)
    image = adapter.prepare_image(Image.new("RGB", (97, 61)))
    widest = widest_locator_answer(adapter, image, "the red circle")
    assert report["widest_answer"] == widest.text and report["widest_answer_tokens"] == widest.tokens
    assert report["locator_budget"] == widest.tokens + LOCATOR_BUDGET_MARGIN
    assert report["margin"] == LOCATOR_BUDGET_MARGIN
    assert report["answer_form"].startswith('```json\n[\n\t{"bbox_2d": [100, 200, 500, 600], "label": "the red')
    # finetune.py's caption length (its default, read from SCTuneConfig) and the end token
    assert report["describer_max_new_tokens"] == SCTuneConfig.describer_max_new_tokens == 30
    assert report["describer_budget"] == 30 + 1
    code, report = run(capsys, "budget", "--model_name_or_path", folder, "--describer_max_new_tokens", 7,
                       "--caption", "a blue carré")
    assert code == 0 and report["describer_budget"] == 7 + 1 and report["model_input_frame"] != [97, 61]
    assert '"label": "a blue carré"' in report["answer_form"]
    # printed as written, not as \u escapes (a user reads the answer form)
    main(["budget", "--model_name_or_path", folder, "--caption", "a blue carré"])
    assert '"label\\": \\"a blue carré' in capsys.readouterr().out
    # training's pixel budget, where given, resizes the image the budget is counted on
    # (the tiny processor's own bound gives 64 x 32 for 1920 x 1080)
    code, bounded = run(capsys, "budget", "--model_name_or_path", folder, "--image_max_pixels", 128 * 128)
    assert code == 0 and report["model_input_frame"] == [64, 32] and bounded["model_input_frame"] == [160, 96]
    assert bounded["image_tokens"] > report["image_tokens"]
    assert report["widest_answer"] == widest_locator_answer(adapter, adapter.prepare_image(
        Image.new("RGB", (1920, 1080))), "a blue carré").text


@pytest.mark.parametrize("layout, model_type, message", [
    ("absent", None, "--model_name_or_path {folder}: no such folder"),
    ("absent", "qwen3_vl", "--model_name_or_path {folder}: no such folder"),
    ("file", None, "--model_name_or_path {folder} is a file, not a checkpoint folder"),
    ("file", "qwen3_vl", "--model_name_or_path {folder} is a file, not a checkpoint folder"),
    ("empty", None, "{folder}/config.json not found: download the checkpoint into {folder} first"),
    ("empty", "qwen3_vl", "{folder}: the tokenizer files cannot be read (it has no tokenizer.json)"),
    ("config_only", None, "{folder} has no tokenizer.json"),
    ("config_only", "qwen3_vl", "{folder} has no tokenizer.json"),
    ("unserved", None, "{folder}/config.json: field 'model_type': no SC-Tune family serves model_type 'molmo2' "
                       "(Molmo2): it answers a grounding request with points, not boxes (see docs/families.md"),
])
def test_budget_names_a_folder_that_is_absent_or_holds_no_tokenizer_in_one_line(capsys, tmp_path, tiny_checkpoint,
                                                                                layout, model_type, message):
    folder = tmp_path / layout
    if layout == "file":
        folder.write_text("not a folder")
    elif layout != "absent":
        folder.mkdir()
    if layout == "config_only":
        shutil.copy(os.path.join(tiny_checkpoint("qwen3_vl"), "config.json"), folder)
    if layout == "unserved":
        (folder / "config.json").write_text('{"model_type": "molmo2"}')
    code, err = run(capsys, "budget", "--model_name_or_path", folder, *(["--model_type", model_type] if model_type
                                                                           else []))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("python -m sc_tune.families budget: error: " + message.format(folder=folder)), err


def test_budget_of_a_folder_missing_the_image_processor_is_one_line_naming_it(capsys, tmp_path, tiny_checkpoint):
    shutil.copy(os.path.join(tiny_checkpoint("qwen3_vl"), "tokenizer.json"), tmp_path)
    code, err = run(capsys, "budget", "--model_name_or_path", tmp_path)
    assert code == 2 and err.startswith(f"python -m sc_tune.families budget: error: {tmp_path}/config.json not "
                                        "found") and err.endswith("; or pass --model_type\n"), err
    code, err = run(capsys, "budget", "--model_name_or_path", tmp_path, "--model_type", "qwen3_vl")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--model_name_or_path {tmp_path}: cannot load its qwen3_vl tokenizer and image processor: " in err
    assert "preprocessor_config.json" in err


def test_budget_of_a_folder_without_a_chat_template_cannot_tell_a_reasoning_only_release(capsys, tmp_path,
                                                                                          tiny_checkpoint):
    """The released non-weight files of a template family may come without the chat template: the budget counts
    answers, not prompts, and says it cannot tell whether the release is reasoning-only. Qwen-VL has no template
    and no reasoning mode: its answer is known."""
    folder = tmp_path / "qwen3_vl"
    shutil.copytree(tiny_checkpoint("qwen3_vl"), folder)
    os.remove(folder / "chat_template.jinja")
    code, report = run(capsys, "budget", "--model_name_or_path", folder)
    assert code == 0 and report["reasoning_only"] == "unknown: no chat template", report
    assert report["describer_budget"] == 30 + 1
    code, report = run(capsys, "budget", "--model_name_or_path", tiny_checkpoint("qwen"))
    assert code == 0 and report["model_type"] == "qwen" and report["reasoning_only"] is None, report


@pytest.mark.parametrize(("argv", "missing"), [
    ([], "command"),
    (["parse", "--answer", "[1, 2, 3, 4]"], "--model_type"),
    (["parse", "--model_type", "qwen2_vl"], "--answer"),
    (["budget"], "--model_name_or_path"),
])
def test_the_command_names_what_it_needs(capsys, argv, missing):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and f"the following arguments are required: {missing}" in capsys.readouterr().err
