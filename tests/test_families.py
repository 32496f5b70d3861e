"""Every registered family, end to end on its tiny model: codec, special tokens, fix_vit/LoRA names, both
SC-Tune phases (full fine-tuning and LoRA) through ``finetune.py``, export and reload, and evaluation.

Parametrized over ``supported_model_types()``, so a family added to the registry is covered here without
editing this file. Per model type the expensive work (a tiny folder from the CLI, one full and one LoRA
run) is done once and shared by the tests that read it.
"""

from __future__ import annotations

import json
import os
import re
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
            # Released checkpoints keep processor settings in files a model/tokenizer save does not write.
            for name in ("processor_config.json", "video_preprocessor_config.json"):
                with open(os.path.join(directory, name), "w") as f:
                    json.dump({"note": f"released {name} of {model_type}", "image_seq_len": 81}, f)
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
def runs(cli_folder, tmp_path_factory):
    """Factory: (trainer, source folder, exported folder) of a full or LoRA SC-Tune run, once per model type."""
    done = {}

    def run(model_type: str, lora: bool):
        key = (model_type, lora)
        if key not in done:
            out = str(tmp_path_factory.mktemp(f"run_{model_type}_{'lora' if lora else 'full'}"))
            # The LoRA run also writes boxes in the generic format, so --box_format is exercised end to end.
            lora_args = ("--use_lora", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0")
            extra = (*lora_args, "--box_format", "generic") if lora else ()
            trainer = _finetune(cli_folder(model_type), out, *extra)
            done[key] = (trainer, cli_folder(model_type), out)
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
    generator = torch.Generator().manual_seed(zlib.crc32(model_type.encode()))
    for size in (None, (97, 61), (45, 130)):  # odd sizes: pixel codecs see odd frames
        image = _image(adapter, size=size)
        step = 1.0 / min(adapter.codec.axis_scales(image.frame))
        for _ in range(5):
            a, b = torch.rand(2, 2, generator=generator).sort(dim=0).values
            box = [float(a[0]), float(a[1]), float(b[0]), float(b[1])]
            target = adapter.locator_target(box, image)
            assert target.endswith(adapter.end_text)
            assert adapter.parse_locator_output(target, image) == pytest.approx(box, abs=step / 2 + 1e-9)
            assert adapter.parse_locator_output(target[: len(target) // 3], image) is None  # truncated
        for malformed in ("", "the red circle", adapter.codec.template.format(1, 2, 100000, 4),
                          adapter.codec.template.format(1, 2, 3, "x")):
            assert adapter.parse_locator_output(malformed + adapter.end_text, image) is None, malformed


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
    describer, locator = set(adapter.suppressed_token_ids()), set(adapter.suppressed_token_ids(describer=False))
    assert media | boxes <= describer and media <= locator
    assert not (set(adapter.end_token_ids) & describer)
    image = _image(adapter)
    target_ids = set(adapter.encode_target(adapter.locator_target([0.1, 0.2, 0.5, 0.6], image)))
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


WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _non_weight_files(folder: str) -> set[str]:
    return {n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and n not in WEIGHTS}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_export_carries_every_non_weight_file_of_the_input(model_type, lora, runs):
    _, source, out = runs(model_type, lora=lora)
    missing = _non_weight_files(source) - _non_weight_files(out)
    assert not missing, f"the export dropped {sorted(missing)}"
    for name in ("processor_config.json", "video_preprocessor_config.json"):
        with open(os.path.join(source, name)) as a, open(os.path.join(out, name)) as b:
            assert json.load(a) == json.load(b)
    if model_type != "qwen":  # the chat template the family's processor renders with is the input's
        from sc_tune.adapters.base import load_chat_tokenizer

        assert load_chat_tokenizer(out).chat_template == load_chat_tokenizer(source).chat_template


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
        assert sample["locator_max_new_tokens"] == adapter.locator_budget([image])  # the widest answer + margin
