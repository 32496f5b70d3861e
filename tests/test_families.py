"""Every registered family, end to end on its tiny model: codec, special tokens, fix_vit/LoRA names, both
SC-Tune phases (full fine-tuning and LoRA) through ``finetune.py``, export and reload, and evaluation.

Parametrized over ``supported_model_types()``, so a family added to the registry is covered here without
editing this file. Per model type the expensive work (a tiny folder from the CLI, one full and one LoRA
run) is done once and shared by the tests that read it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image

from sc_tune.adapters import Family, family_for, register, supported_model_types
from sc_tune.modeling import freeze_vision_tower, load_model_and_adapter
from sc_tune.rewards import REWARDS, cycle_iou
from tests.conftest import ROOT, SAMPLE_DATA, SAMPLE_IMAGES
from tests.helpers import processor_settings

MODEL_TYPES = supported_model_types()
# What a special token's name says it is, judged independently of the adapters' own rules: media tokens
# (image/video placeholders and frames) and box/reference tokens.
MEDIA_NAME = re.compile(r"image|video|vision|img", re.IGNORECASE)
BOX_NAME = re.compile(r"box|ref|quad", re.IGNORECASE)
STEPS = 3  # describer (1 PPO epoch), locator, describer


# ---------------------------------------------------------------- shared, built once per model type
@pytest.fixture(scope="session")
def cli_folder(tmp_path_factory):
    """Factory: the tiny folder ``python -m sc_tune.tiny --model_type MT --output_dir D`` writes (in process)."""
    from sc_tune.tiny import main

    built = {}

    def make(model_type: str) -> str:
        if model_type not in built:
            directory = str(tmp_path_factory.mktemp(f"cli_{model_type}"))
            main(["--model_type", model_type, "--output_dir", directory])
            built[model_type] = directory
        return built[model_type]

    return make


def caption_dependent_boxes(captions):
    """A box that is a function of the caption text: sampled and greedy captions that differ get
    different rewards, so the describer's advantage is not zero even though a random model writes no box."""
    boxes = []
    for caption in captions:
        h = zlib.crc32(caption.encode("utf8"))
        x, y = (h % 50) / 100, (h // 50 % 50) / 100
        boxes.append([x, y, x + 0.5, y + 0.5])
    return boxes


def caption_box_iou(pred_boxes, target_N4, captions):
    """A reward registered for these runs (``--reward caption_box_iou``): the IoU of the caption's own box
    (``caption_dependent_boxes``) with the true box. The real locator still writes its answers; a random model's
    hold no box."""
    return cycle_iou(caption_dependent_boxes(captions), target_N4)


def _finetune(source: str, output_dir: str, *extra: str):
    import finetune

    args = [
        "--model_name_or_path", source, "--data_path", SAMPLE_DATA, "--image_folder", SAMPLE_IMAGES,
        "--output_dir", output_dir, "--max_steps", str(STEPS), "--describer_update_steps", "1",
        "--locator_update_steps", "1", "--ppo_epochs", "1", "--per_device_train_batch_size", "2",
        "--describer_max_new_tokens", "4", "--describer_min_new_tokens", "2", "--locator_max_new_tokens", "4",
        "--describer_lr", "1e-3", "--locator_lr", "1e-3", "--weight_decay", "0", "--use_cpu", "True",
        "--skip_preflight", "True",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0",
        "--reward", "caption_box_iou", *extra,
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(REWARDS, "caption_box_iou", caption_box_iou)  # the rewards' registry: --reward's choices
        return finetune.main(args)


@pytest.fixture(scope="session")
def release_folder(cli_folder, tmp_path_factory):
    """Factory: the tiny folder plus what a released checkpoint holds besides weights, tokenizer and image
    processor (``add_release_files``), so that a run's export has something to carry."""
    built = {}

    def make(model_type: str) -> str:
        if model_type not in built:
            directory = str(tmp_path_factory.mktemp(f"release_{model_type}"))
            shutil.copytree(cli_folder(model_type), directory, dirs_exist_ok=True)
            add_release_files(directory, model_type)
            built[model_type] = directory
        return built[model_type]

    return make


def add_release_files(directory: str, model_type: str) -> None:
    """A hub download's other files: a model card, a licence, the processor's settings (``processor_config.json``,
    unless the tiny builder wrote the family's own), the legacy ``chat_template.json`` (the folder's own template,
    where it has one) and a video processor config; and files an export must not carry: another weight file and
    the state of the run that wrote the folder."""
    from safetensors.torch import save_file

    def write(name, text):
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)

    write("README.md", "---\nlicense: apache-2.0\n---\n# a tiny model card\n")
    write("LICENSE", "Apache License, Version 2.0\n")
    if not os.path.isfile(os.path.join(directory, "processor_config.json")):
        write("processor_config.json", json.dumps({"note": f"released processor settings of {model_type}"}))
    template = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(template) and not os.path.isfile(os.path.join(directory, "chat_template.json")):
        write("chat_template.json", json.dumps({"chat_template": open(template).read()}))
    preprocessor = os.path.join(directory, "preprocessor_config.json")
    if os.path.isfile(preprocessor):
        shutil.copyfile(preprocessor, os.path.join(directory, "video_preprocessor_config.json"))
    save_file({"w": torch.zeros(2)}, os.path.join(directory, "consolidated.safetensors"))  # a weight: not carried
    write("trainer_state.json", json.dumps({"global_step": 123}))  # an earlier run's record: not carried


@pytest.fixture(scope="session")
def runs(release_folder, tmp_path_factory):
    """Factory: (trainer, source folder, exported folder) of a full or LoRA SC-Tune run, once per model type."""
    done = {}

    def run(model_type: str, lora: bool):
        key = (model_type, lora)
        if key not in done:
            out = str(tmp_path_factory.mktemp(f"run_{model_type}_{'lora' if lora else 'full'}"))
            # The LoRA run also writes boxes in the generic format, so --box_format is exercised end to end.
            lora_args = ("--use_lora", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0")
            extra = (*lora_args, "--box_format", "generic") if lora else ()
            trainer = _finetune(release_folder(model_type), out, *extra)
            done[key] = (trainer, release_folder(model_type), out)
        return done[key]

    return run


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _in(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def _image(adapter, name="003.png", size=None):
    image = Image.open(os.path.join(SAMPLE_IMAGES, "images", name)).convert("RGB")
    return adapter.prepare_image(image.resize(size) if size else image)


# ---------------------------------------------------------------- the registry and the CLI
def test_registry_errors_name_the_supported_types():
    with pytest.raises(ValueError, match="supported: .*" + re.escape(MODEL_TYPES[0])):
        family_for("no_such_model")
    taken = family_for(MODEL_TYPES[0])
    with pytest.raises(ValueError, match="is served by"):
        register(Family("impostor", (MODEL_TYPES[0],), taken.adapter, taken.model_class))
    assert family_for(MODEL_TYPES[0]) is taken


@pytest.mark.slow  # a subprocess: most of its time is importing torch and transformers again
def test_tiny_cli_runs_as_a_module(tmp_path):
    model_type = MODEL_TYPES[-1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sc_tune.tiny", "--model_type", model_type, "--output_dir", str(tmp_path / "d")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == model_type


def test_every_registered_model_type_has_a_tiny_builder():
    # The builders live above the adapters (sc_tune/tiny/), keyed by the registry's model types: a family
    # registered without one would leave its tests and `python -m sc_tune.tiny` without a model.
    from sc_tune.tiny import SAVERS

    assert set(SAVERS) == set(supported_model_types())


def test_tiny_cli_rejects_an_unknown_type_listing_the_supported_ones(tmp_path, capsys):
    from sc_tune.tiny import main

    with pytest.raises(SystemExit):
        main(["--model_type", "nope", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "nope" in err and all(t in err for t in MODEL_TYPES)


def test_export_runs_the_family_hook(monkeypatch, tmp_path, cli_folder):
    import dataclasses

    from sc_tune.adapters import registry
    from sc_tune.export import finalize_export

    model_type = MODEL_TYPES[0]
    calls = []
    hooked = dataclasses.replace(family_for(model_type), finalize_export=lambda out, src: calls.append((out, src)))
    monkeypatch.setitem(registry._BY_MODEL_TYPE, model_type, hooked)
    finalize_export(str(tmp_path), cli_folder(model_type))
    assert calls == [(str(tmp_path), cli_folder(model_type))]


# ---------------------------------------------------------------- per family, no training
@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("box_format", ["native", "generic"])
def test_codec_round_trip_and_malformed_text(model_type, box_format, cli_folder):
    adapter = family_for(model_type).adapter.from_pretrained(cli_folder(model_type), box_format=box_format)
    assert adapter.box_format == box_format
    if box_format == "generic":
        assert adapter.codec.format([0.1, 0.2, 0.3, 0.4], (77, 55)) == "[100, 200, 300, 400]"
        # The locator is asked for the box in the form its target takes, not in the family's own grounding prompt
        # (but Qwen-VL's: the reference release's raw prompt has no words to ask with; its open <box> starts the answer).
        if model_type != "qwen":
            assert adapter.codec.request in adapter.locator_prompt("the red circle", _image(adapter))
    generator = torch.Generator().manual_seed(zlib.crc32(model_type.encode()))
    for size in (None, (97, 61), (45, 130)):  # odd sizes: pixel codecs see odd frames
        image = _image(adapter, size=size)
        step = 1.0 / min(adapter.codec.axis_scales(image.frame))
        for _ in range(5):
            a, b = torch.rand(2, 2, generator=generator).sort(dim=0).values
            box = [float(a[0]), float(a[1]), float(b[0]), float(b[1])]
            target = adapter.locator_target(box, image, "the red circle")
            assert target.endswith(adapter.end_text)
            assert adapter.parse_locator_output(target, image) == pytest.approx(box, abs=step / 2 + 1e-9)
            end = adapter.locator_answer_end(target)  # where generation stops: the box is complete there
            assert adapter.parse_locator_output(target[:end], image) == pytest.approx(box, abs=step / 2 + 1e-9)
            assert adapter.parse_locator_output(target[: len(target) // 3], image) is None  # truncated
            assert adapter.locator_answer_end(target[: len(target) // 3]) is None
        for malformed in ("", "the red circle", adapter.codec.text_of([1, 2, 100000, 4]),
                          adapter.codec.text_of([1, 2, 3, "x"])):
            reading = adapter.read_locator_output(malformed + adapter.end_text, image)
            assert reading.box is None and reading.reason, malformed


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_vision_and_lora_names_match_real_parameters(model_type, cli_folder):
    model, adapter = load_model_and_adapter(cli_folder(model_type))
    names = list(_params(model))
    assert any(_in(n, adapter.vision_prefix) for n in names), adapter.vision_prefix
    for prefix in adapter.vision_trainable_prefixes:
        assert _in(prefix, adapter.vision_prefix) and any(_in(n, prefix) for n in names), prefix
    freeze_vision_tower(model, adapter)
    for name, param in model.named_parameters():
        kept = not _in(name, adapter.vision_prefix) or any(_in(name, p) for p in adapter.vision_trainable_prefixes)
        assert param.requires_grad == kept, name
    targets = [n for n, m in model.named_modules() if re.fullmatch(adapter.lora_target_modules, n)]
    assert targets and all(isinstance(dict(model.named_modules())[n], torch.nn.Linear) for n in targets)
    assert not any(_in(n, adapter.vision_prefix) for n in targets)  # LoRA stays in the language model
    # every decoder layer gets adapters (hybrid models: linear-attention layers too)
    layer_ids = {m.group(1) for n in targets for m in [re.search(r"layers\.(\d+)\.", n)] if m}
    all_layers = {m.group(1) for n in names if not _in(n, adapter.vision_prefix)
                  for m in [re.search(r"layers\.(\d+)\.", n)] if m}  # fmt: skip
    assert layer_ids == all_layers


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_describer_never_samples_media_or_box_tokens(model_type, cli_folder, monkeypatch):
    from sc_tune.rollout import GenerationSettings, generate

    model, adapter = load_model_and_adapter(cli_folder(model_type))
    specials = adapter.special_tokens()
    media = {i for t, i in specials.items() if MEDIA_NAME.search(t)}
    boxes = {i for t, i in specials.items() if BOX_NAME.search(t)}
    assert media, "the tiny tokenizer carries the family's image tokens"
    describer, locator = set(adapter.suppressed_token_ids(describer=True)), set(adapter.suppressed_token_ids(describer=False))
    assert media | boxes <= describer and media <= locator
    assert not (set(adapter.end_token_ids) & describer)
    image = _image(adapter)
    target_ids = set(adapter.encode_target(adapter.locator_target([0.1, 0.2, 0.5, 0.6], image, "the dog")))
    assert not (target_ids & locator)  # the locator can still write its own box format

    # Behaviour: aim the output layer at the suppressed tokens, so that an unsuppressed model samples one.
    batch = adapter.build_batch([adapter.describer_prompt([0.1, 0.2, 0.5, 0.6], image)] * 2, [image, image])
    model.eval()
    output_layer = model.get_output_embeddings()
    seen = []
    hook = output_layer.register_forward_hook(lambda module, args, out: seen.append(args[0][:, -1]))
    with torch.no_grad():
        model(**batch.inputs)
        hook.remove()
        hidden = seen[0].mean(0)
        output_layer.weight[sorted(describer)] = 1e4 * hidden / hidden.norm()
    settings = GenerationSettings(max_new_tokens=1, min_new_tokens=1, do_sample=True, top_k=0, top_p=1.0)
    torch.manual_seed(0)
    first = generate(model, adapter, batch, settings, skip_special_tokens=True).ids_BT[:, 0]
    assert not (set(first.tolist()) & describer)
    monkeypatch.setattr(adapter, "suppressed_token_ids", lambda describer=True: [])
    unsuppressed = generate(model, adapter, batch, settings, skip_special_tokens=True).ids_BT[:, 0]
    assert set(unsuppressed.tolist()) <= describer  # the control: without suppression it would have


# ---------------------------------------------------------------- per family, SC-Tune runs
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_finetune_runs_both_phases_and_moves_only_trainable_weights(model_type, runs):
    trainer, source, _ = runs(model_type, lora=False)
    adapter = trainer.adapter
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["phase"] for h in logs] == ["describer", "locator", "describer"]
    assert logs[0]["describer/nonzero_advantage"] > 0 and logs[1]["locator/loss"] > 0
    initial = _params(load_model_and_adapter(source)[0])
    after = _params(trainer.model)
    moved = {n for n in after if not torch.equal(after[n], initial[n])}
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen and all(_in(n, adapter.vision_prefix) for n in frozen)  # fix_vit (finetune.py's default)
    assert not moved & set(frozen)  # the frozen tower never moves
    assert any(not _in(n, adapter.vision_prefix) for n in moved)  # the language model learned
    for prefix in adapter.vision_trainable_prefixes:  # ... and so did the connector fix_vit keeps trainable
        assert any(_in(n, prefix) for n in moved), prefix


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_export_reloads_to_equal_tensors(model_type, runs):
    trainer, _, out = runs(model_type, lora=False)
    reloaded, adapter = load_model_and_adapter(out)  # what a second finetune.py run from O loads
    assert type(adapter) is type(trainer.adapter)
    reloaded_params = _params(reloaded)
    assert reloaded_params.keys() == _params(trainer.model).keys()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), reloaded_params[name]), name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lora_run_trains_adapters_only_and_merges(model_type, runs):
    from sc_tune.box_codecs import GENERIC_CODEC

    trainer, source, out = runs(model_type, lora=True)
    assert trainer.adapter.codec is GENERIC_CODEC  # finetune.py passed --box_format generic to the adapter
    base = _params(load_model_and_adapter(source)[0])
    lora_moved = 0
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            lora_moved += "lora_B" in name and bool(param.detach().abs().sum() > 0)  # B starts at zero
        else:
            plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            assert torch.equal(param.detach(), base[plain]), name
    assert lora_moved > 0
    assert [h["phase"] for h in trainer.state.log_history if "loss" in h] == ["describer", "locator", "describer"]

    merged, adapter = load_model_and_adapter(out)
    image = _image(adapter, "000.png")
    batch = adapter.build_batch([adapter.describer_prompt([0.1, 0.2, 0.5, 0.6], image)], [image])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch.inputs).logits
        assert torch.allclose(merged(**batch.inputs).logits, expected, atol=1e-4)
        original, _ = load_model_and_adapter(source)
        assert not torch.allclose(original(**batch.inputs).logits, expected, atol=1e-4)  # the adapters mattered


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_export_carries_every_non_weight_file_of_the_input(model_type, lora, runs):
    """Issue 18's acceptance: the output folder's non-weight files are a superset of the input's. Carried files
    are byte-identical (processor and template settings survive), the model's own files keep the input's settings,
    and a weight or an earlier run's record of the input is never copied over the run's own."""
    from sc_tune.adapters.base import load_chat_tokenizer
    from sc_tune.export import NOT_CARRIED

    _, source, out = runs(model_type, lora=lora)
    weights = ("*.safetensors", "*.bin", "*.index.json")
    files = lambda folder: {n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))}  # noqa: E731
    inputs = {n for n in files(source) if not any(fnmatch.fnmatch(n, w) for w in weights)}
    assert {"README.md", "processor_config.json", "trainer_state.json", "config.json"} <= inputs
    missing = inputs - files(out)
    assert not missing, f"the export dropped {sorted(missing)}"
    read = lambda folder, name: open(os.path.join(folder, name), "rb").read()  # noqa: E731
    for name in sorted(inputs):
        if not any(fnmatch.fnmatch(name, p) for p in NOT_CARRIED):
            assert read(out, name) == read(source, name), name
    for name in ("config.json", "generation_config.json"):  # written from the trained model: the same settings
        volatile = {"dtype", "torch_dtype", "transformers_version"}
        before, after = (
            {k: v for k, v in json.loads(read(folder, name)).items() if k not in volatile} for folder in (source, out)
        )
        assert after == before, name
    assert json.loads(read(out, "trainer_state.json")).get("global_step") != 123  # this run's, not the input's
    assert not os.path.exists(os.path.join(out, "consolidated.safetensors"))
    if model_type != "qwen":  # the chat template the family's processor renders with is the input's
        assert load_chat_tokenizer(out).chat_template == load_chat_tokenizer(source).chat_template


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_export_loads_with_the_input_processor_settings(model_type, runs):
    """The family's own processor reads the input's settings from the output folder: ``AutoProcessor`` where
    it loads here, else every processor file (image token counts, chat template, image processor, tokenizer)."""
    _, source, out = runs(model_type, lora=False)
    before = processor_settings(source)
    assert processor_settings(out) == before
    if "tokenizer" in before:  # AutoTokenizer cannot load it (Qwen-VL's remote code): the family's own can
        adapters = [family_for(model_type).adapter.from_pretrained(folder) for folder in (source, out)]
        assert adapters[0].tokenizer.get_vocab() == adapters[1].tokenizer.get_vocab()
        assert len(adapters[0].tokenizer.get_vocab()) > 100
    else:
        assert "vocab" in before and len(before["vocab"]) > 100


# The families whose processor the generic check cannot build: Qwen-VL's is remote code
# (tests/test_qwen_vl_official.py); MiniCPM-V's reads its video processor's settings and Mistral 3's imports
# torchvision (each built apart in tests/test_template_families.py).
PROCESSOR_BUILT_APART = {"qwen", "minicpmv4_6", "minicpmv4_7", "mistral3"}


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if t not in PROCESSOR_BUILT_APART])
def test_the_exported_folders_own_processor_builds_the_adapters_inputs(model_type, runs):
    """What the family's chat demo does with the output folder: its own processor (``AutoProcessor``, or its class
    around the folder's parts where AutoProcessor needs torchvision for a video processor) builds, from the prompt the
    adapter renders from that folder, the adapter's very input ids, pixels and token types. An export that dropped or
    changed a processor file (the image token count, the pixel bounds, the template) fails here."""
    from tests.helpers import assert_the_familys_processor_builds_the_adapters_inputs

    _, _, out = runs(model_type, lora=False)
    adapter = family_for(model_type).adapter.from_pretrained(out)
    assert_the_familys_processor_builds_the_adapters_inputs(out, adapter)


def test_smolvlm_v1_export_loads_in_idefics3_processor_and_agrees_with_the_adapter(runs):
    """SmolVLM v1 (idefics3) loads with AutoProcessor here: the exported folder's processor takes its
    image_seq_len from the carried processor_config.json (the default would be 169) and its template from the
    carried chat_template.json, and expands an image into exactly the ids the adapter builds."""
    from transformers import AutoProcessor

    trainer, _, out = runs("idefics3", lora=False)
    adapter = trainer.adapter
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Idefics3Processor"
    assert processor.image_seq_len == adapter.image_seq_len != 169
    image = Image.open(os.path.join(SAMPLE_IMAGES, "images", "003.png")).convert("RGB")
    prepared = adapter.prepare_image(image)
    prompt = adapter.locator_prompt("the red circle", prepared)
    ids = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == adapter.encode_prompt(prompt, prepared)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_self_consistency_evaluation_of_the_exported_model(model_type, runs):
    from sc_tune.evaluation import evaluate_self_consistency
    from sc_tune.evaluation.records import load_annotation_records
    from sc_tune.rollout import GenerationSettings

    _, _, out = runs(model_type, lora=False)
    model, adapter = load_model_and_adapter(out)
    records = load_annotation_records(SAMPLE_DATA)[:3]
    metrics, samples = evaluate_self_consistency(
        model, adapter, records, SAMPLE_IMAGES, batch_size=2, describe_settings=GenerationSettings(4),
        locate_settings=GenerationSettings(4), distributed=False,
    )  # fmt: skip
    assert metrics["num_samples"] == metrics["num_records"] == 3 and [s["index"] for s in samples] == [0, 1, 2]
    assert metrics["num_parse_failures"] == sum(s["pred_bbox"] is None for s in samples)
    for sample, record in zip(samples, records):
        image = adapter.prepare_image(Image.open(os.path.join(SAMPLE_IMAGES, record["image"])).convert("RGB"))
        assert sample["bbox"] == record["bbox"]
        assert sample["pred_bbox"] == adapter.parse_locator_output(sample["locator_text"], image)
        widest = adapter.locator_target([1] * 4, image, sample["caption"])
        up_to_box = widest[: adapter.locator_answer_end(widest)]
        assert sample["locator_max_new_tokens"] >= len(adapter.encode_target(up_to_box))
