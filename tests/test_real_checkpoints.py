"""Against the released checkpoints' own files (tokenizers, chat templates, processor settings; no weights).

They live outside the repository (``tests/real_checkpoints.py`` says where); without them this module skips once.
Each test is parametrised over the folders that are there:

- the tiny stand-in chat templates render the describer and locator prompts exactly as the released templates do
  (what catches a stand-in that drifted);
- reasoning-only releases (GLM-4.1V-9B-Thinking, Qwen3-VL-*-Thinking) are refused, naming the checkpoint;
- the locator budget holds the widest released answer, counted with the real Qwen and Gemma 3 tokenizers (where a
  folder has the released tokenizer alone, as a fresh clone's fetched ones, with the tiny checkpoint's processor
  settings at the released pixel bound and its template in place of those not at hand);
- a tiny random model on a release's real tokenizer, template and processor settings builds batches, trains on its
  real answer form and locates; on a released tokenizer without them, its forced answers are read back; the same
  on Qwen-VL-Chat's released ``qwen.tiktoken`` with the native model;
- ``python -m sc_tune.families budget`` on a release's folder;
- locating from the scored image prefix, with the released template and processor (images of two sizes);
- the family's own processor builds the same inputs as the adapter from the rendered prompt and image.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from tests import real_checkpoints as real
from tests.conftest import ROOT

if not real.available():
    pytest.skip(f"the released checkpoints' files are not here ({real.REAL_CHECKPOINTS}); the real-fixture tests "
                "need them", allow_module_level=True)

from sc_tune.adapters import adapter_class, family_for  # noqa: E402
from sc_tune.adapters.base import ThinkingCheckpointError  # noqa: E402
from sc_tune.modeling import load_model_and_adapter  # noqa: E402
from sc_tune.prompt_cache import ScoredPrompts, keep_prompt_columns, scoring_inputs, shared_prefix_batch  # noqa: E402
from sc_tune.rollout import (LOCATOR_BUDGET_MARGIN, GenerationSettings, describe, locate,  # noqa: E402
                             locate_from_prefix, locator_budget, widest_locator_answer)
from tests.helpers import (assert_forced_captions_are_described_back,  # noqa: E402
                           assert_forced_locator_answers_are_located_back, assert_prefix_batch_decodes_as_a_prefill,
                           assert_the_familys_processor_builds_the_adapters_inputs)

BOX = [0.1, 0.2, 0.5, 0.6]
CAPTION = "the red circle"
LONG_CAPTION = "the man in the white shirt standing on the left, next to the small dog with a red collar"


def _prompts(adapter, image):
    return [adapter.describer_prompt(BOX, image), adapter.locator_prompt(CAPTION, image)]


TEMPLATE_CASES = [(folder, model_type) for folder in real.present(real.TEMPLATE_FOLDERS, ("template",))
                  for model_type in real.TEMPLATE_FOLDERS[folder]]


@pytest.mark.parametrize("folder,model_type", TEMPLATE_CASES)
def test_stand_in_templates_render_the_released_prompts(folder, model_type, tiny_checkpoint):
    adapter = family_for(model_type).adapter.from_pretrained(tiny_checkpoint(model_type))
    image = adapter.prepare_image(Image.new("RGB", (97, 61)))
    with_system = lambda: adapter.render("Locate it.", system="Be brief.")  # noqa: E731 (how the release takes one)
    stand_in = _prompts(adapter, image) + [with_system()]
    adapter.tokenizer.chat_template = real.released_template(folder)
    assert _prompts(adapter, image) + [with_system()] == stand_in
    assert adapter.thinking_only_reason() is None  # instruct / hybrid with thinking off: accepted


@pytest.mark.parametrize("folder", real.present(["zai-org__GLM-4.1V-9B-Thinking"], ("template",)))
def test_the_glm_stand_in_keeps_the_released_glm_turn_layout(folder, tiny_checkpoint):
    # The released GLM-4.5V / 4.6V templates are not at hand; GLM-4.1V-Thinking's shares their turn layout, which
    # the hybrid stand-in must reproduce with thinking on (off, it adds /nothink and the empty <think></think>), with
    # and without a system turn (given as a string: the 4.1V template writes the content as it stands).
    adapter = adapter_class("glm4v").from_pretrained(tiny_checkpoint("glm4v"))
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the dog?"}]}
    conversations = [[user], [{"role": "system", "content": "Be brief."}, user]]

    def render():
        return [adapter.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                for messages in conversations]

    stand_in = render()
    adapter.tokenizer.chat_template = real.released_template(folder)
    turn = "<|user|>\n<|begin_of_image|><|image|><|end_of_image|>Where is the dog?<|assistant|>\n"
    assert render() == stand_in == ["[gMASK]<sop>" + turn, "[gMASK]<sop><|system|>\nBe brief." + turn]


@pytest.mark.parametrize("folder", real.present(real.THINKING_FOLDERS, ("template",)))
def test_reasoning_only_releases_are_refused_by_name(folder, tiny_checkpoint, tmp_path):
    model_type = real.THINKING_FOLDERS[folder]
    checkpoint = str(tmp_path / folder.split("__")[1])
    shutil.copytree(tiny_checkpoint(model_type), checkpoint)
    with open(os.path.join(checkpoint, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(real.released_template(folder))
    with pytest.raises(ThinkingCheckpointError, match=re.escape(checkpoint)) as refused:
        load_model_and_adapter(checkpoint)  # refused before any weight is loaded
    assert "reasoning" in str(refused.value)


def _real_adapter(folder):
    return real.real_adapter(real.TOKENIZER_FOLDERS[folder], folder)


# The released tokenizers at hand: each budget test runs on every one (none is skipped for a missing folder), also
# where only the tokenizer is (a fresh clone's fetched files: Qwen2.5-VL's, Qwen3-VL's and Gemma 3's tokenizer and
# template).
# Gemma 3's writes each digit as its own token, Qwen's up to three digits as one.
BUDGET_FOLDERS = (real.present(["Qwen__Qwen2.5-VL-7B-Instruct", "Qwen__Qwen3-VL-8B-Instruct", "google__gemma-3-4b-it"],
                               ("tokenizer",))
                  + real.present(["Qwen__Qwen-VL-Chat"], ("tiktoken",)))

# The released image processors' pixel bound (preprocessor_config.json's longest_edge): where that file is not at
# hand, adapter_on_released_tokenizer lifts the tiny processor's bound to it, so a photo is resized to the released
# frame and its numbers have the released width. Checked against the released file wherever it is at hand.
RELEASED_MAX_PIXELS = {"Qwen__Qwen2.5-VL-7B-Instruct": 12_845_056, "Qwen__Qwen3-VL-8B-Instruct": 16_777_216}


# Folders with a released tokenizer but not also its template and processor settings (a fresh clone's fetched
# files; a folder kept without the template): the tiny model on the released files below does not run there.
PARTIAL_TOKENIZER_FOLDERS = [f for f in real.present(real.TOKENIZER_FOLDERS, ("tokenizer",))
                             if f not in real.present(real.TOKENIZER_FOLDERS, ("tokenizer", "template", "processor"))]


@pytest.fixture(scope="module")
def adapter_on_released_tokenizer(tiny_checkpoint, tmp_path_factory):
    """Factory: the adapter on ``folder``'s released tokenizer, template and processor settings; where some are not
    at hand, on the tiny checkpoint's in their place (the template tests hold the stand-in templates to the released
    ones), with the released pixel bound, so a photo is resized to the released frame. Built once per folder
    (loading Gemma 3's tokenizer takes seconds)."""
    built = {}

    def make(folder):
        if folder in built:
            return built[folder]
        if folder not in PARTIAL_TOKENIZER_FOLDERS:
            adapter = _real_adapter(folder)
        else:
            model_type = real.TOKENIZER_FOLDERS[folder]
            tiny = tiny_checkpoint(model_type)
            overlaid = str(tmp_path_factory.mktemp("released_tokenizer") / folder)
            adapter = family_for(model_type).adapter.from_pretrained(
                real.tiny_folder_on_released_files(folder, tiny, overlaid))
            assert len(adapter.tokenizer) > len(AutoTokenizer.from_pretrained(tiny))  # the released vocabulary
        if folder in RELEASED_MAX_PIXELS:
            if os.path.isfile(real.path(folder, "preprocessor_config.json")):
                assert adapter.image_processor.size["longest_edge"] == RELEASED_MAX_PIXELS[folder]
            else:
                adapter.limit_image_pixels(None, RELEASED_MAX_PIXELS[folder])
        built[folder] = adapter
        return adapter

    return make


@pytest.mark.parametrize("folder", BUDGET_FOLDERS)
def test_the_locator_budget_holds_the_widest_released_answer_with_the_real_tokenizer(folder, tiny_checkpoint,
                                                                                     adapter_on_released_tokenizer):
    if folder == "Qwen__Qwen-VL-Chat":
        return _qwen_vl_chat_budget_holds_its_readme_answers(folder, tiny_checkpoint)
    adapter = adapter_on_released_tokenizer(folder)
    # A 1920x1080 photo: Qwen2.5-VL writes pixels of its resized input, four digits here.
    image = adapter.prepare_image(Image.new("RGB", (1920, 1080)))
    if folder in RELEASED_PHOTO_TOKENS:  # resized as released (on the tiny processor too: the frame its numbers use)
        assert image.num_tokens == RELEASED_PHOTO_TOKENS[folder][1]
    budget = locator_budget(adapter, [image], [LONG_CAPTION])
    widest = widest_locator_answer(adapter, image, LONG_CAPTION)
    assert budget == widest.tokens + LOCATOR_BUDGET_MARGIN
    encode = adapter.encode_target

    def tokens_to_box(answer):
        end = adapter.locator_answer_end(answer)
        assert end is not None, answer
        return len(encode(answer[:end]))

    # Every released answer quoted in the family's table (the refused multi-box ones too: decoding stops after their
    # first box), its numbers at the widest this frame allows, fits up to where decoding stops, with the margin to
    # spare; so do the codec's layouts with a long label.
    widest_number = str(max(adapter.codec.axis_scales(image.frame)))
    released = [re.sub(r"(?<!\w)\d+", widest_number, e.text) for e in adapter.answer_examples
                if adapter.locator_answer_end(e.text) is not None]
    assert released
    layouts = adapter.locator_answer_layouts([1.0, 1.0, 1.0, 1.0], image, LONG_CAPTION)
    for answer in released + layouts:
        assert tokens_to_box(answer) <= budget - LOCATOR_BUDGET_MARGIN, answer
    # Spacing no documentation shows takes the margin.
    for answer in released + layouts:
        assert tokens_to_box(answer.replace(", ", " , ").replace("[", "[ ")) <= budget, answer
    # The fenced list up to its box (the form the issue counted at 31-33 tokens) does not fit the bare-box budget of
    # before (the '{"bbox_2d": ...}' answer plus its end token): that budget cut nearly every released answer off.
    fenced = adapter.locator_answer([1.0, 1.0, 1.0, 1.0], image, CAPTION)
    bare_budget = len(encode(adapter.codec.format([1.0, 1.0, 1.0, 1.0], image.frame) + adapter.end_text))
    assert len(encode(fenced[: adapter.locator_answer_end(fenced)])) > bare_budget
    # The full answer with its label is longer still: generation stops at the box, so the label costs no budget.
    assert len(encode(adapter.locator_target([1.0, 1.0, 1.0, 1.0], image, LONG_CAPTION))) > budget


# What a 1920x1080 photo costs with the released processor settings: (patch side, image tokens). A token is one
# merged patch of 2 x 2; Qwen2.5-VL's released maximum is 12,845,056 pixels, Qwen3-VL-8B's 16,777,216.
RELEASED_PHOTO_TOKENS = {"Qwen__Qwen2.5-VL-7B-Instruct": (14, 2691), "Qwen__Qwen3-VL-8B-Instruct": (16, 2040)}


@pytest.mark.parametrize("folder", real.present(list(RELEASED_PHOTO_TOKENS), ("tokenizer", "processor")))
def test_a_pixel_budget_on_the_released_processor_bounds_a_photo(folder):
    """``--image_max_pixels 200704`` (448 x 448) on the released processor settings: a photo that takes ~2,000-2,700
    image tokens as released is resized to at most 200,704 pixels, at most 256 tokens."""
    patch, released_tokens = RELEASED_PHOTO_TOKENS[folder]
    photo = Image.new("RGB", (1920, 1080))
    adapter = _real_adapter(folder)
    assert adapter.patch_size == patch and adapter.prepare_image(photo).num_tokens == released_tokens
    adapter.limit_image_pixels(None, 200704)
    image = adapter.prepare_image(photo)
    width, height = image.frame
    assert 0.9 * 200704 <= width * height <= 200704 and image.num_tokens == width * height // (2 * patch) ** 2 <= 256
    assert abs(width / height - 1920 / 1080) < 0.2  # the aspect ratio kept, on the grid of merged patches


def _qwen_vl_chat_budget_holds_its_readme_answers(folder, tiny_checkpoint):
    """Qwen-VL-Chat's budget holds its README's answers, counted with the real tiktoken vocabulary."""
    from sc_tune.models.qwen_vl.tokenization import QWenTokenizer

    adapter = adapter_class("qwen").from_pretrained(tiny_checkpoint("qwen"))
    adapter.tokenizer = QWenTokenizer.from_pretrained(real.path(folder))
    # The released folder names no span: the tokenizer takes the official model's 256 image positions by default.
    assert len(adapter.tokenizer("<img>demo.jpeg</img>")["input_ids"]) == 1 + 256 + 1
    image = adapter.prepare_image(Image.new("RGB", (97, 61)))
    budget = locator_budget(adapter, [image])
    for example in adapter.answer_examples:
        # the README's answers open with <ref>...</ref><box>, which SC-Tune's prompt already holds
        answer = example.text.split("<box>", 1)[1]
        assert len(adapter.encode_target(answer[: adapter.locator_answer_end(answer)])) <= budget, answer


@pytest.fixture(scope="module", params=real.present(real.TOKENIZER_FOLDERS, ("tokenizer", "template", "processor")))
def released_files_model(request):
    folder = request.param
    model, adapter = real.tiny_model_on_real_files(real.TOKENIZER_FOLDERS[folder], folder)
    return folder, model.eval(), adapter


def test_a_tiny_model_on_released_files_trains_on_its_answer_form_and_locates(released_files_model):
    folder, model, adapter = released_files_model
    assert len(adapter.tokenizer) == len(real.real_tokenizer(folder))  # the released vocabulary, not a toy one
    image = adapter.prepare_image(Image.new("RGB", (61, 47), (200, 30, 30)))
    assert adapter.tokenizer.chat_template == real.released_template(folder)  # prompts in the released text
    prompt = adapter.locator_prompt(CAPTION, image)
    target = adapter.locator_target(BOX, image, CAPTION)
    assert adapter.parse_locator_output(target, image) == pytest.approx(BOX, abs=1.0 / min(image.frame + (1000,)))
    batch = adapter.build_batch([prompt], [image], [target])
    assert (batch.labels != -100).sum() == len(adapter.encode_target(target))
    loss = model(**batch.inputs, labels=batch.labels).loss  # placeholders match the real processor's features
    assert torch.isfinite(loss) and loss.item() > 0
    # Made to write the released answer form, token by token of the released vocabulary, it is located back to the
    # box through every loop the trainer decodes with; a caption it writes decodes to the caption's text.
    assert_forced_locator_answers_are_located_back(model, adapter)
    assert_forced_captions_are_described_back(model, adapter, [CAPTION, LONG_CAPTION])


@pytest.mark.parametrize("folder", real.present(["Qwen__Qwen2.5-VL-7B-Instruct", "Qwen__Qwen3-VL-8B-Instruct"],
                                                ("tokenizer", "template", "processor")))
def test_budget_of_a_released_folder_through_the_families_command(folder):
    # Run as users run it; the Qwen3-VL folder has no config.json, so it names its model_type.
    command = [sys.executable, "-m", "sc_tune.families", "budget", "--model_name_or_path", real.path(folder)]
    if folder.startswith("Qwen__Qwen3"):
        command += ["--model_type", "qwen3_vl"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["locator_budget"] == report["widest_answer_tokens"] + report["margin"]
    assert '"bbox_2d": [' in report["widest_answer"] and report["reasoning_only"] is None
    assert report["image_tokens"] == RELEASED_PHOTO_TOKENS[folder][1]  # a 1920x1080 photo, as released
    done = subprocess.run(command + ["--image_max_pixels", "200704"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    limited = json.loads(done.stdout)
    assert limited["image_tokens"] <= 256 and limited["model_input_frame"][0] * limited["model_input_frame"][1] <= 200704


def test_locating_from_the_scored_image_prefix_on_released_files(released_files_model):
    """The describer rollout's locating resumes from the image prefix its scoring pass cached (``sc_tune.prompt_cache``):
    with the released template and processor, every row's prefix holds its whole image span, images of two sizes
    make prefixes of two lengths, and the answers equal a fresh prefill's."""
    folder, model, adapter = released_files_model
    if not adapter.moves_cached_prompt_columns(model, 100):
        pytest.skip(f"{folder}: its family locates from a full prefill")
    torch.manual_seed(0)
    images = [adapter.prepare_image(Image.new("RGB", size, colour))
              for size, colour in (((61, 47), (200, 30, 30)), ((240, 47), (30, 200, 30)))]
    batch, sampled = describe(model, adapter, images, [BOX, [0.5, 0.5, 0.52, 0.55]],
                              GenerationSettings(max_new_tokens=4, do_sample=True, top_k=50))
    teacher = scoring_inputs(model, adapter, adapter.append_completion(batch, sampled.ids_BT, sampled.mask_BT))
    width = batch.inputs["input_ids"].shape[1]
    scored = ScoredPrompts(batch, keep_prompt_columns(model(**teacher, use_cache=True).cache, width), width - 1)
    captions, source_rows = [CAPTION, LONG_CAPTION, "a"], [1, 0, 0]
    rows_images = [images[r] for r in source_rows]
    prompts = [adapter.locator_prompt(c, im) for c, im in zip(captions, rows_images)]
    shared = shared_prefix_batch(model, adapter, scored, source_rows, prompts, rows_images)
    vision_end = adapter.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    prefix_ids, prefix_mask = shared.batch.input_ids[:, : shared.columns], shared.batch.inputs["attention_mask"]
    assert (prefix_ids == vision_end).any(1).all(), "every row's image span comes from the cache"
    assert len(set(prefix_mask[:, : shared.columns].sum(1).tolist())) == 2, "two image sizes, two prefix lengths"
    settings = GenerationSettings(max_new_tokens=6)
    resumed = locate_from_prefix(model, adapter, rows_images, captions, settings, scored, source_rows)
    assert_prefix_batch_decodes_as_a_prefill(model, adapter, prompts, rows_images, shared)
    assert resumed == locate(model, adapter, rows_images, captions, settings)


@pytest.mark.parametrize("folder", PARTIAL_TOKENIZER_FOLDERS)
def test_forced_answers_on_a_released_tokenizer_without_the_other_files(folder, adapter_on_released_tokenizer):
    """A tiny random model of the released vocabulary (the released template and processor settings where the folder
    has them, else the tiny checkpoint's), made to write the released answer form token by token, is located back
    to the box through every loop the trainer decodes with; a caption it writes decodes to the caption's text."""
    model_type = real.TOKENIZER_FOLDERS[folder]
    adapter = adapter_on_released_tokenizer(folder)
    model = real.tiny_model_of(model_type, real.released_config(model_type, folder, adapter.tokenizer)).eval()
    assert model.get_input_embeddings().num_embeddings >= len(adapter.tokenizer)  # the released vocabulary's rows
    assert_forced_locator_answers_are_located_back(model, adapter)
    assert_forced_captions_are_described_back(model, adapter, [CAPTION, LONG_CAPTION])


@pytest.mark.parametrize("folder", real.present(["google__gemma-3-4b-it"], ("tokenizer",)))
def test_a_caption_keeps_its_word_boundaries_where_the_released_tokenizer_adds_whitespace_tokens(
        folder, adapter_on_released_tokenizer):
    """Gemma 3's released tokenizer adds newlines, tabs and their runs as tokens (62 of them): the locator's prompt
    keeps a caption's newline and tab (removed, they joined the words around them), and still drops an image marker
    the caption spells."""
    adapter = adapter_on_released_tokenizer(folder)
    assert {"\n", "\n\n", "\t"} <= set(adapter.special_tokens())
    caption = "a dog\non the\tgrass"
    assert adapter.plain_text(caption) == caption
    assert adapter.plain_text(f"a dog\n{adapter.image_marker}on") == "a dog\non"
    image = adapter.prepare_image(Image.new("RGB", (64, 48), (200, 30, 30)))
    assert caption in adapter.locator_prompt(caption, image)


@pytest.mark.parametrize("folder", real.present(["Qwen__Qwen-VL-Chat"], ("tiktoken",)))
def test_forced_answers_on_qwen_vl_chats_released_vocabulary(folder):
    """Qwen-VL-Chat, the paper's model: a tiny random native model of the released vocabulary (qwen.tiktoken's
    151,643 ranks, the special tokens at the released ids, the released 151,936 embedding rows), made to write
    Qwen-VL-Chat's grounding answer token by token, is located back to the box through every loop the trainer
    decodes with; a caption it writes decodes to the caption's text."""
    from sc_tune.adapters.qwen_vl import QwenVLAdapter
    from sc_tune.models.qwen_vl.image_processing import QWenVLImageProcessor
    from sc_tune.models.qwen_vl.modeling import QWenLMHeadModel
    from sc_tune.models.qwen_vl.tokenization import QWenTokenizer
    from sc_tune.tiny.qwen_vl import tiny_config

    tokenizer = QWenTokenizer(real.path(folder, "qwen.tiktoken"), image_token_span=4)
    # The ids the official tokenizer gives these tokens with the released file (its docstring and the README).
    assert {t: tokenizer.special_tokens[t] for t in ("<|endoftext|>", "<ref>", "<box>", "<img>", "<imgpad>")} == {
        "<|endoftext|>": 151643, "<ref>": 151851, "<box>": 151853, "<img>": 151857, "<imgpad>": 151859}
    assert len(tokenizer) == 151860  # the ranks and 217 special tokens
    config = tiny_config(len(tokenizer.mergeable_ranks), n_queries=4, vocab_size=151936)  # Qwen-VL-Chat's rows
    torch.manual_seed(0)
    model = QWenLMHeadModel(config).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eod_id
    adapter = QwenVLAdapter(tokenizer, QWenVLImageProcessor.from_config(config))
    ran = assert_forced_locator_answers_are_located_back(model, adapter)
    assert "locate/static" in ran and "prefix/generate" in ran, ran  # every loop, and locating from the prefix
    assert_forced_captions_are_described_back(model, adapter, [CAPTION, LONG_CAPTION])


@pytest.mark.parametrize("folder", real.present(real.TOKENIZER_FOLDERS, ("tokenizer", "template", "processor")))
def test_the_familys_processor_builds_the_same_inputs_from_the_rendered_prompt(folder):
    """The family's own processor (what its chat demo runs), given SC-Tune's rendered prompt and the image, builds
    the very inputs SC-Tune's adapter builds: the image marker expanded into the same image tokens, the same pixels
    and the same per-token types, from the released tokenizer, processor settings and template. (A chat template
    adds its own special tokens, so the processor adds none here, as its apply_chat_template does.)"""
    assert_the_familys_processor_builds_the_adapters_inputs(real.path(folder), _real_adapter(folder))
