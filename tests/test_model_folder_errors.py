"""A model folder that cannot load, and data too small for one step, end in one ``finetune.py: error:`` (or
``evaluate.py: error:``) line naming the folder or file: no traceback, no hub, no silent zero.

The folders are copies of the committed tiny warm start (a Qwen3-VL, vocab_size 437) with one file removed or broken.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from sc_tune.checkpoints import CheckpointError
from sc_tune.data import AnnotationError
from sc_tune.modeling import load_model_and_adapter
from tests.conftest import ROOT, WARM_START


def _remove(*names):
    def broken(folder):
        for name in names:
            os.remove(os.path.join(folder, name))
    return broken


def _edit_config(change):
    def broken(folder):
        path = os.path.join(folder, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        change(config)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)
    return broken


def _vocabulary_lost(folder):
    """A tokenizer.json that parses but holds only the 12 added special tokens (what a folder without its vocabulary
    loads as, saved back)."""
    from transformers import AutoTokenizer

    os.remove(os.path.join(folder, "tokenizer.json"))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)


# case -> (how the folder breaks, what the message names besides the folder)
BROKEN = {
    "no tokenizer.json": (_remove("tokenizer.json"), ["has no tokenizer.json", "vocab.json and merges.txt"]),
    "no tokenizer files": (_remove("tokenizer.json", "tokenizer_config.json"), ["has no tokenizer.json"]),
    "a tokenizer.json without the vocabulary": (_vocabulary_lost, ["read from tokenizer.json holds only its 12 added "
                                                                   "special token(s), no vocabulary"]),
    "unknown model_type": (_edit_config(lambda c: c.update(model_type="llama_vl")),
                           ["config.json: field 'model_type'", "'llama_vl'"]),
    "a model_type transformers implements and SC-Tune does not serve": (
        _edit_config(lambda c: c.update(model_type="molmo2")),
        ["config.json: field 'model_type'",
         "'molmo2' (Molmo2): it answers a grounding request with points, not boxes"]),
    "no model_type": (_edit_config(lambda c: c.pop("model_type")), ["config.json: field 'model_type' is missing"]),
    "no preprocessor_config.json": (_remove("preprocessor_config.json"), ["preprocessor_config.json"]),
    "no model.safetensors": (_remove("model.safetensors"), ["model.safetensors", "the weights"]),
    "no chat template": (_remove("chat_template.jinja"), ["has no chat template"]),
}


def broken_folder(tmp_path, case: str) -> str:
    folder = str(tmp_path / "model")
    shutil.copytree(WARM_START, folder)
    BROKEN[case][0](folder)
    return folder


def _data(tmp_path, boxes: int, bad: int = 0) -> tuple[str, str]:
    """(annotation file, image folder): ``boxes`` good records on 64x64 images, then ``bad`` with a pixel box."""
    images = tmp_path / "data"
    images.mkdir(exist_ok=True)
    records = []
    for i in range(boxes + bad):
        Image.new("RGB", (64, 64), (40 * i % 256, 90, 160)).save(images / f"{i}.png")
        records.append({"image": f"{i}.png", "bbox": [0.1, 0.1, 0.6, 0.6] if i < boxes else [10, 10, 40, 40]})
    path = images / "annotations.json"
    path.write_text(json.dumps(records))
    return str(path), str(images)


def _finetune_argv(model: str, data: str, images: str, output: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", model, "--data_path", data, "--image_folder", images, "--output_dir", output,
            "--use_cpu", "True", "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none",
            "--skip_preflight", "True", *extra]


def _run_all(script: str, cases: dict[str, list[str]], scratch) -> dict[str, dict]:
    """Each case's ``{"returncode", "stderr"}`` as ``python <script> argv`` gives them, all cases in one process
    (tests/cli_driver.py: one torch import instead of one per case)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # as a user runs it: no offline switch
    cases_file = scratch / f"{script}.cases.json"
    cases_file.write_text(json.dumps(cases))
    result = subprocess.run([sys.executable, os.path.join("tests", "cli_driver.py"), script, str(cases_file)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_one_error_line(result: dict, script: str, names: list[str]) -> str:
    assert result["returncode"] == 1, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert "huggingface.co" not in result["stderr"]
    last = result["stderr"].strip().splitlines()[-1]
    assert "hub" not in last.lower(), last
    assert last.startswith(f"{script}: error: "), last
    for name in names:
        assert name in last, (name, last)
    return last


# ------------------------------------------------------------------------------------------- the loader both share
@pytest.mark.parametrize("case", BROKEN)
def test_the_loader_refuses_a_broken_model_folder_naming_it_and_the_file(tmp_path, case):
    folder = broken_folder(tmp_path, case)
    with pytest.raises(CheckpointError) as refused:
        load_model_and_adapter(folder)
    message = str(refused.value)
    assert folder in message and all(name in message for name in BROKEN[case][1]), message
    assert "hub" not in message.lower()


def test_the_committed_warm_start_still_loads():
    model, adapter = load_model_and_adapter(WARM_START)
    assert len(adapter.tokenizer) == 437 and model.config.text_config.vocab_size == 437


def test_a_folder_with_the_slow_tokenizers_files_instead_of_tokenizer_json_loads(tmp_path):
    # The refusals above must not catch a folder that has its vocabulary in the slow tokenizer's own files
    # (vocab.json and merges.txt for Qwen's BPE) and no tokenizer.json: it loads, and encodes as the full folder does.
    folder = str(tmp_path / "model")
    shutil.copytree(WARM_START, folder)
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        bpe = json.load(f)["model"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(bpe["vocab"], f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in bpe["merges"]))
    os.remove(os.path.join(folder, "tokenizer.json"))
    _, adapter = load_model_and_adapter(folder)
    _, full = load_model_and_adapter(WARM_START)
    text = full.render("Where is the red circle on the left?")
    assert adapter.tokenizer(text)["input_ids"] == full.tokenizer(text)["input_ids"]
    assert len(adapter.tokenizer) == len(full.tokenizer) == 437


def test_a_tiny_qwen_vl_folder_without_its_tiktoken_vocabulary_is_refused(tiny_checkpoint, tmp_path):
    folder = str(tmp_path / "qwen")
    shutil.copytree(tiny_checkpoint("qwen"), folder)
    load_model_and_adapter(folder)  # whole: loads
    ranks = os.path.join(folder, "qwen.tiktoken")
    with open(ranks, encoding="utf-8") as f:
        lines = f.readlines()
    with open(ranks, "w", encoding="utf-8") as f:
        f.writelines(lines[:5])  # five BPE ranks left: a small vocabulary still loads (nothing tells it from a toy's)
    load_model_and_adapter(folder)
    open(ranks, "w").close()  # emptied: no vocabulary at all
    with pytest.raises(CheckpointError, match=f"{folder}: qwen.tiktoken cannot be read"):
        load_model_and_adapter(folder)
    os.remove(ranks)
    with pytest.raises(CheckpointError, match=f"{folder} has no qwen.tiktoken"):
        load_model_and_adapter(folder)


def test_the_image_processors_settings_load_from_processor_config_jsons_block(tiny_checkpoint, tmp_path):
    """A folder may keep the image processor's settings in processor_config.json's ``image_processor`` block instead
    of preprocessor_config.json (transformers 5's save_pretrained writes them there): it loads, with those settings;
    a processor_config.json without the block is no substitute."""
    folder = str(tmp_path / "qwen2_vl")
    shutil.copytree(tiny_checkpoint("qwen2_vl"), folder)
    with open(os.path.join(folder, "preprocessor_config.json"), encoding="utf-8") as f:
        settings = json.load(f)
    os.remove(os.path.join(folder, "preprocessor_config.json"))
    nested = os.path.join(folder, "processor_config.json")
    with open(nested, "w", encoding="utf-8") as f:
        json.dump({"processor_class": "Qwen2VLProcessor"}, f)
    with pytest.raises(CheckpointError, match="nor a processor_config.json with an image_processor block"):
        load_model_and_adapter(folder)
    settings["size"] = {"longest_edge": 2 * settings["size"]["longest_edge"], "shortest_edge": 784}
    with open(nested, "w", encoding="utf-8") as f:
        json.dump({"processor_class": "Qwen2VLProcessor", "image_processor": settings}, f)
    _, adapter = load_model_and_adapter(folder)
    assert adapter.image_processor.size == settings["size"]  # read from the block, not a default


# ------------------------------------------------------------------------------------------- the command lines
EVALUATE_CASES = ["no tokenizer.json", "unknown model_type", "no preprocessor_config.json", "no model.safetensors",
                  "a model_type transformers implements and SC-Tune does not serve"]


def _thinking_folder(tmp_path) -> str:
    """The warm start with a template that opens <think> for every answer (as a -Thinking release does)."""
    folder = str(tmp_path / "thinking")
    shutil.copytree(WARM_START, folder)
    template = os.path.join(folder, "chat_template.jinja")
    with open(template, encoding="utf-8") as f:
        text = f.read()
    assert text.count("<|im_start|>assistant\n{% endif %}") == 1
    with open(template, "w", encoding="utf-8") as f:
        f.write(text.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}"))
    return folder


def _evaluate_argv(folder: str, data: str, images: str, output: str) -> list[str]:
    return ["--task", "self-consistency", "--model_name_or_path", folder, "--data_path", data, "--image_folder",
            images, "--output_dir", output]


@pytest.fixture(scope="module")
def command_lines(tmp_path_factory):
    """Every command-line case below, run as the commands run (tests/cli_driver.py), and what its one error line
    must name: ``{script: {case: (result, names)}}``."""
    root = tmp_path_factory.mktemp("command_lines")
    cases = {"finetune.py": {}, "evaluate.py": {}}
    for script, broken, records, argv_of in (("finetune.py", BROKEN, 4, _finetune_argv),
                                             ("evaluate.py", EVALUATE_CASES, 2, _evaluate_argv)):
        for n, case in enumerate(broken):
            where = root / f"{script}{n}"
            where.mkdir()
            folder = broken_folder(where, case)
            data, images = _data(where, records)
            cases[script][case] = (argv_of(folder, data, images, str(where / "out")), [folder, *BROKEN[case][1]])
    where = root / "too_few"
    where.mkdir()
    data, images = _data(where, 1)
    cases["finetune.py"]["too few records"] = (_finetune_argv(WARM_START, data, images, str(where / "out")), [
        data, "1 usable record(s) cannot fill one training step of 2 records",
        "--per_device_train_batch_size 2 x --gradient_accumulation_steps 1 x 1 process(es)",
    ])
    where = root / "thinking"
    where.mkdir()
    folder = _thinking_folder(where)
    data, images = _data(where, 4)
    names = [folder, "is a reasoning-only checkpoint"]
    cases["finetune.py"]["reasoning-only"] = (_finetune_argv(folder, data, images, str(where / "out")), names)
    cases["evaluate.py"]["reasoning-only"] = (_evaluate_argv(folder, data, images, str(where / "eval")), names)
    results = {script: _run_all(script, {case: argv for case, (argv, _) in by_case.items()}, root)
               for script, by_case in cases.items()}
    return {script: {case: (results[script][case], names) for case, (_, names) in by_case.items()}
            for script, by_case in cases.items()}


@pytest.mark.parametrize("case", BROKEN)
def test_finetune_prints_one_error_line_for_a_broken_model_folder(command_lines, case):
    result, names = command_lines["finetune.py"][case]
    _assert_one_error_line(result, "finetune.py", names)


@pytest.mark.parametrize("case", EVALUATE_CASES)
def test_evaluate_prints_one_error_line_for_a_broken_model_folder(command_lines, case):
    result, names = command_lines["evaluate.py"][case]
    _assert_one_error_line(result, "evaluate.py", names)


# ------------------------------------------------------------------------------------------- too few records
def test_too_few_records_for_one_step_is_an_error_line_naming_the_arithmetic(command_lines):
    result, names = command_lines["finetune.py"]["too few records"]
    _assert_one_error_line(result, "finetune.py", names)


def _refuse_model_loading(monkeypatch):
    import finetune

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was counted")

    monkeypatch.setattr(finetune, "load_model_and_adapter", loaded)
    return finetune


def test_too_few_records_after_skips_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    finetune = _refuse_model_loading(monkeypatch)
    data, images = _data(tmp_path, 1, bad=2)
    argv = _finetune_argv(WARM_START, data, images, str(tmp_path / "out"), "--skip_bad_records", "True",
                          "--gradient_accumulation_steps", "2")
    with pytest.raises(AnnotationError) as refused:
        finetune.main(argv)
    message = str(refused.value)
    assert message.startswith(f"{data}: 1 usable record(s) (after skipping bad records) cannot fill one training "
                              "step of 4 records"), message
    assert isinstance(refused.value, finetune.INPUT_ERRORS)


def test_too_few_records_after_unusable_images_are_skipped_is_refused_before_training(tmp_path, monkeypatch):
    import finetune

    data, images = _data(tmp_path, 2)
    (tmp_path / "data" / "1.png").write_bytes(b"not a png")  # skipped by the image check, after the model loads

    def trained(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(finetune.SCTuneTrainer, "__init__", trained)
    argv = _finetune_argv(WARM_START, data, images, str(tmp_path / "out"), "--skip_bad_records", "True")
    with pytest.raises(AnnotationError, match=r"1 usable record\(s\) \(after skipping bad records and unusable "
                                              r"images\) cannot fill one training step of 2"):
        finetune.main(argv)


def test_enough_records_for_one_step_pass_the_count(tmp_path, monkeypatch):
    finetune = _refuse_model_loading(monkeypatch)
    data, images = _data(tmp_path, 2)
    with pytest.raises(AssertionError, match="the model was loaded"):  # the count let it through to the model
        finetune.main(_finetune_argv(WARM_START, data, images, str(tmp_path / "out")))


@pytest.mark.parametrize("script", ["finetune.py", "evaluate.py"])
def test_a_reasoning_only_checkpoint_is_one_error_line_naming_it(command_lines, script):
    """A template that opens <think> for every answer (a -Thinking release) is refused by name: one line, not the
    ThinkingCheckpointError's traceback."""
    result, names = command_lines[script]["reasoning-only"]
    _assert_one_error_line(result, script, names)
