"""The released checkpoints' own tokenizers, chat templates and processor settings (no weights).

They live outside the repository, in ``shared/real_checkpoints`` beside the checkout (provenance in its README): the module
skips when that folder is absent (a user's fresh clone). What they catch that the tiny stand-ins cannot:
real token counts of real answer forms (the locator budget), the released templates' text (the stand-in
templates must write the same prompts), the released processors' image-token counts, and thinking-only
templates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sc_tune.adapters import adapter_class
from sc_tune.adapters.base import LOCATOR_BUDGET_MARGIN, ThinkingOnlyCheckpoint
from sc_tune.box_codecs import GENERIC_CODEC
from sc_tune.rollout import GenerationSettings, fit_locator_budget, locate
from sc_tune.tiny.template_families import build_tiny_template_family
from sc_tune.tiny import build_tiny

REAL = Path(__file__).resolve().parents[2] / "shared" / "real_checkpoints"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent (the released non-weight files)")

QWEN25 = REAL / "Qwen__Qwen2.5-VL-7B-Instruct"
QWEN3 = REAL / "Qwen__Qwen3-VL-8B-Instruct"
GEMMA3 = REAL / "google__gemma-3-4b-it"
GLM41_THINKING = REAL / "zai-org__GLM-4.1V-9B-Thinking"

# The real answer form of Qwen2.5-VL / Qwen3-VL grounding (their cookbooks), in the whitespace variants the
# released models write, with the widest coordinates each convention allows.
FENCED_VARIANTS = ('```json\n[\n\t{{"bbox_2d": [{0}, {1}, {0}, {1}], "label": "the man"}}\n]\n```',
                   '```json\n[\n  {{"bbox_2d": [{0}, {1}, {0}, {1}], "label": "the man"}}\n]\n```',
                   '```json\n[\n    {{"bbox_2d": [{0}, {1}, {0}, {1}], "label": "the man"}}\n]\n```',
                   '[{{"bbox_2d": [{0}, {1}, {0}, {1}], "label": "the man"}}]')


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def real_tokenizer(folder: Path):
    from sc_tune.adapters.base import load_chat_tokenizer

    return load_chat_tokenizer(str(folder))


@pytest.fixture(scope="module")
def qwen25_folder(tmp_path_factory) -> Path:
    """A loadable Qwen2.5-VL folder: the released tokenizer, chat template, preprocessor and config (shrunk to a
    tiny random model of the same vocabulary and token ids)."""
    folder = tmp_path_factory.mktemp("qwen25_real")
    for name in ("tokenizer.json", "chat_template.json", "preprocessor_config.json"):
        shutil.copy(QWEN25 / name, folder / name)
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = json.loads((QWEN25 / "config.json").read_text())
    config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config["vision_config"].update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                   fullatt_block_indexes=[0])
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def test_qwen25_stand_in_template_writes_the_released_prompts():
    real = real_tokenizer(QWEN25)
    _, stand_in, _ = build_tiny("qwen2_5_vl")
    for text in ("Describe the object at {\"bbox_2d\": [1, 2, 3, 4]} in a few words.",
                 "Locate the man in this image and output the bbox coordinates in JSON format."):
        rendered = [t.apply_chat_template(messages(text), tokenize=False, add_generation_prompt=True,
                                          enable_thinking=False) for t in (real, stand_in)]
        assert rendered[0] == rendered[1]
        assert rendered[0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_qwen25_adapter_renders_through_the_released_template_with_real_image_tokens(qwen25_folder):
    adapter = adapter_class("qwen2_5_vl").from_pretrained(str(qwen25_folder))
    image = adapter.prepare_image(Image.new("RGB", (640, 480)))
    # The released processor (14 px patches merged 2 x 2, factor 28): 640 x 480 -> 644 x 476.
    assert image.frame == (644, 476) == adapter.default_frame((640, 480))
    prompt = adapter.locator_prompt("the man", image)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.")
    ids = adapter.encode_prompt(prompt, image)
    assert ids.count(adapter.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == (644 // 28) * (476 // 28)


def test_real_qwen_budgets_cover_the_widest_released_answers(qwen25_folder):
    adapter = adapter_class("qwen2_5_vl").from_pretrained(str(qwen25_folder))
    big = adapter.prepare_image(Image.new("RGB", (2500, 1400)))  # four-digit pixel coordinates
    budget = adapter.locator_budget([big])
    width, height = big.frame
    for variant in FENCED_VARIANTS:
        answer = variant.format(width, height)
        through_box = answer[: adapter.codec.box_end(answer)]
        assert len(adapter.encode_target(through_box)) <= budget, answer
        assert adapter.parse_locator_output(answer, big) == pytest.approx([1.0, 1.0, 1.0, 1.0])
    # The defect this fixes: the budget sized for the bare {"bbox_2d": ...} object (29 at 0..1000) cut the real form.
    assert budget >= 31 + LOCATOR_BUDGET_MARGIN

    qwen3 = real_tokenizer(QWEN3)
    _, stand_in, processor = build_tiny("qwen3_vl")
    qwen3.chat_template = stand_in.chat_template  # the Qwen3-VL release's template is not among the fixtures
    adapter3 = adapter_class("qwen3_vl")(qwen3, processor)
    image = adapter3.prepare_image(Image.new("RGB", (56, 56)))
    budget3 = adapter3.locator_budget([image])
    for variant in FENCED_VARIANTS:
        answer = variant.format(1000, 1000)
        assert len(qwen3(answer[: adapter3.codec.box_end(answer)], add_special_tokens=False)["input_ids"]) <= budget3
    assert budget3 == budget  # the same vocabulary and answer form; 1000 and four-digit pixels split alike


def test_real_tokenizer_round_trips_every_target_and_a_cycle_runs(qwen25_folder):
    adapter = adapter_class("qwen2_5_vl").from_pretrained(str(qwen25_folder))
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(qwen25_folder).eval()
    images = [adapter.prepare_image(Image.new("RGB", (112, 84), c)) for c in ("red", "blue")]
    box = [0.1, 0.25, 0.5, 1.0]
    for image in images:
        target = adapter.locator_target(box, image, 'the "tall" man')
        decoded = adapter.tokenizer.decode(adapter.encode_target(target))
        assert decoded == target
        assert adapter.parse_locator_output(decoded, image) == pytest.approx(box, abs=1 / min(image.frame))
    settings = fit_locator_budget(adapter, images, GenerationSettings(max_new_tokens=20))
    boxes, texts = locate(model, adapter, images, ["the man", "a dog"], GenerationSettings(max_new_tokens=20))
    assert len(texts) == 2 and settings.max_new_tokens == adapter.locator_budget(images)


def test_gemma3_release_stand_in_template_and_image_tokens():
    real = real_tokenizer(GEMMA3)
    _, stand_in, _ = build_tiny_template_family("gemma3")
    text = f"Locate the man. {GENERIC_CODEC.request}"
    rendered = [t.apply_chat_template(messages(text), tokenize=False, add_generation_prompt=True) for t in (real, stand_in)]
    assert rendered[0] == rendered[1]
    adapter = adapter_class("gemma3").from_pretrained(str(GEMMA3))  # the released tokenizer, template and processor
    image = adapter.prepare_image(Image.new("RGB", (300, 200)))
    assert image.num_tokens == 256 == json.loads((GEMMA3 / "processor_config.json").read_text())["image_seq_length"]
    ids = adapter.encode_prompt(adapter.locator_prompt("the man", image), image)
    assert ids.count(adapter.tokenizer.convert_tokens_to_ids("<image_soft_token>")) == 256
    assert not adapter.grounding_prior


def test_thinking_only_glm_release_is_refused_by_name(tmp_path):
    from sc_tune.tiny import save_tiny

    folder = Path(save_tiny(tmp_path / "glm", "glm4v"))
    adapter_class("glm4v").from_pretrained(str(folder))  # the stand-in (GLM-4.5V-style) template switches it off
    (folder / "chat_template.jinja").write_text((GLM41_THINKING / "chat_template.jinja").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ThinkingOnlyCheckpoint, match=str(folder)):
        adapter_class("glm4v").from_pretrained(str(folder))


def test_export_carries_the_released_processor_files(tmp_path):
    """An export folder holds the model's own config and tokenizer; everything else of the release comes along,
    so the family's own processor loads it with the released settings."""
    from transformers import AutoProcessor

    from sc_tune.export import carry_source_files

    out = tmp_path / "export"
    out.mkdir()
    shutil.copy(GEMMA3 / "config.json", out / "config.json")
    copied = carry_source_files(str(out), str(GEMMA3))
    assert "processor_config.json" in copied and "tokenizer.json" in copied and "config.json" not in copied
    released = AutoProcessor.from_pretrained(GEMMA3)
    exported = AutoProcessor.from_pretrained(out)
    assert exported.image_seq_length == released.image_seq_length == 256
    assert exported.tokenizer.chat_template == released.tokenizer.chat_template
