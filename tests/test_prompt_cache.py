"""Prompt caches within a describer rollout serve the passes after them: exact, and really used.

``--snapshot_prompt_cache`` (on by default) lets the describer rollout skip prefills: the snapshot scores the sampled
captions (prompt + caption, teacher-forced), keeps that pass's key/value cache cropped to the prompt, decodes its
greedy captions from it, and starts the locator prompts from their image prefix in it (Qwen-VL and the Qwen2
families, images of two sizes); with fused decoding the scoring pass itself starts from the sampling loop's cache of
the snapshot's prompts. These tests pin that the captions, boxes, log-probs, their logits and the training losses
equal those of a fresh prefill, with another batch prefilled in between where a model keeps a position state, and
that the fresh prefill is really skipped (else the option would be a no-op).
"""

import copy
import json
import os

import pytest
import torch

from sc_tune.adapters.qwen_vl import QwenVLAdapter
from sc_tune.arguments import SCTuneConfig
from sc_tune.cycle import RolloutCycle, SampledCaptions, caption_logprobs
from sc_tune.decoding import Decoding
from sc_tune.modeling import freeze_vision_tower, load_model_and_adapter
from sc_tune.prompt_cache import (ScoredPrompts, keep_prompt_columns, prompt_rows_cache, scoring_inputs,
                                  shared_prefix_batch,
                                  uncached_inputs)
from sc_tune.rollout import (Completions, GenerationSettings, describe, describe_with_greedy, generate, locate,
                             locate_from_prefix)
from sc_tune.snapshot import active_adapter, row_adapters
from tests.conftest import SAMPLE_IMAGES
from tests.helpers import (FAST, RecordingCycle, assert_prefix_batch_decodes_as_a_prefill, sample_images, small_lora,
                           two_adapter_model, two_phase_trainer)

GREEDY = GenerationSettings(max_new_tokens=8)
SAMPLED = GenerationSettings(max_new_tokens=8, do_sample=True, top_k=50, top_p=1.0)


def _scored_prompt_cache(model, adapter, batch, sampled):
    """What the trainer's scoring pass leaves: the cache of prompt + sampled caption, cropped to the prompt - 1."""
    teacher = scoring_inputs(model, adapter, adapter.append_completion(batch, sampled.ids_BT, sampled.mask_BT))
    outputs = model(**teacher, use_cache=True)
    return keep_prompt_columns(outputs.cache, batch.inputs["input_ids"].shape[1])


class _ForwardWidths:
    """Records the width of input_ids of every forward call of a model."""

    def __init__(self, model):
        self.widths = []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.widths.append(ids.shape[1])


# The 1-D rotary families (sc_tune.adapters.unpadded_positions): their scoring pass reads at generate's unpadded
# positions; EXAONE 4.5 and HyperCLOVA X count columns in both. The window-layer families (Aya Vision's Cohere2,
# Gemma 3, EXAONE 4's) resume only below their window: their tiny one (64) is widened to hold the test's calls.
RESUMING_FAMILIES = ["qwen", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision", "internvl",
                     "mistral3", "smolvlm", "idefics3", "idefics2", "ovis2", "aya_vision", "gemma3", "exaone4_5",
                     "hyperclovax_vision_v2"]
WIDER_WINDOWS = {"aya_vision": 256, "gemma3": 256, "exaone4_5": 256}


def _checkpoint(tiny_checkpoint, tmp_path_factory, model_type):
    """The tiny checkpoint of ``model_type``; a window-layer family's with a window wide enough for the tests' calls."""
    folder = tiny_checkpoint(model_type)
    if model_type not in WIDER_WINDOWS:
        return folder
    return _with_window(folder, tmp_path_factory.mktemp(f"wide_{model_type}"), WIDER_WINDOWS[model_type])


def _with_window(folder, target, window: int) -> str:
    import json
    import shutil

    shutil.copytree(folder, target, dirs_exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    config["text_config"]["sliding_window"] = window
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


@pytest.mark.parametrize("model_type", RESUMING_FAMILIES)
def test_greedy_decoding_from_the_scoring_cache_equals_a_fresh_prefill(tiny_checkpoint, tmp_path_factory, model_type):
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(_checkpoint(tiny_checkpoint, tmp_path_factory, model_type))
    model.eval()
    images, boxes = sample_images(adapter, widened=1)
    boxes[1] = [0.5, 0.5, 0.51, 0.52]  # other digits: prompts of different lengths, so rows are left-padded
    batch, sampled = describe(model, adapter, images, boxes, SAMPLED)
    assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "the test needs left padding"
    width = batch.inputs["input_ids"].shape[1]
    assert adapter.resumes_from_scoring_cache(model, width, width + sampled.ids_BT.shape[1])
    fresh = generate(model, adapter, batch, GREEDY, skip_special_tokens=True)

    cache = _scored_prompt_cache(model, adapter, batch, sampled)
    # Another batch's prefill and teacher-forced pass in between: what decoding resumes from must not hang on the
    # position state the model kept from its last pass (a forward sets it as generate's prefill does).
    other_batch, other_sampled = describe(model, adapter, images[1:], boxes[1:], SAMPLED)
    _scored_prompt_cache(model, adapter, other_batch, other_sampled)
    widths = _ForwardWidths(model)
    resumed = generate(model, adapter, batch, GREEDY, skip_special_tokens=True, prompt_cache=cache)
    widths.handle.remove()
    assert widths.widths[0] == 1, "decoding did not start from the cache: the prompt was prefilled again"
    assert torch.equal(resumed.ids_BT, fresh.ids_BT) and resumed.texts == fresh.texts

    # Stronger than equal argmaxes: every step's logits agree.
    kwargs = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True, "output_logits": True,
              "pad_token_id": adapter.pad_token_id}
    plain = model.generate(**batch.inputs, **kwargs)
    cache = _scored_prompt_cache(model, adapter, batch, sampled)
    # With the positions rollout.generate gives a batch resuming from a cache of its own layout.
    positions = adapter.resumed_positions(model, batch.input_ids, batch.inputs["attention_mask"], batch.images)
    cached = model.generate(**adapter.resumed_decoding_inputs({**batch.inputs, **positions}), **kwargs, cache=cache)
    assert torch.equal(plain.sequences[:, width:], cached.sequences[:, width:])
    for step_plain, step_cached in zip(plain.logits, cached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_plain, rtol=0, atol=1e-5)


# Captions of different token lengths, so that the locator rows' tails are left-padded among themselves, and
# source rows that repeat and come out of order (the trainer's 2B rows point back at B prompt rows). "This ..."
# shares one more token with Qwen-VL's describer prompt (``<ref>This</ref><box>...``): a longer prefix in one row.
CAPTIONS = ["This red circle", "a", "the small blue square at the top left of the picture", "the circle", "red"]
SOURCE_ROWS = [0, 1, 2, 0, 1]


def _scored_and_located_rows(model, adapter):
    images, boxes = sample_images(adapter, widened=1)
    boxes[1] = [0.5, 0.5, 0.51, 0.52]  # other digits: describer prompts of different lengths (left padding)
    batch, sampled = describe(model, adapter, images, boxes, SAMPLED)
    assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "the test needs left padding"
    scored = ScoredPrompts(batch, _scored_prompt_cache(model, adapter, batch, sampled), batch.input_ids.shape[1] - 1)
    return scored, [images[r] for r in SOURCE_ROWS]


# Qwen-VL's rotary positions are column indices (cached keys are re-rotated as they move); the Qwen2 families' M-RoPE
# positions are counted over each row's own tokens (keys move as they are, the batch gets its own rope index); so are
# the 1-D rotary families' full-attention text models, once the scoring pass reads at generate's unpadded positions.
MOVING_FAMILIES = ["qwen", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "llava_next",
                   "llava_onevision", "internvl", "mistral3", "smolvlm", "idefics3", "ovis2"]
# LLaVA-1.5 center-crops every image to one view of one token count: its prefixes are all as long.
ONE_SPAN_LENGTH = {"llava"}


def _image_end_id(adapter):
    """The token that closes the image span: ``</img>`` (Qwen-VL), ``<|vision_end|>`` (the Qwen2 families); ``None``
    where the span is its image tokens alone (LLaVA's ``<image>`` repeated)."""
    if isinstance(adapter, QwenVLAdapter):
        return adapter.tokenizer.img_end_id
    if adapter.tokenizer.convert_tokens_to_ids("<|vision_end|>") != adapter.tokenizer.unk_token_id:
        return adapter.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    return None


def _holds_whole_image_spans(adapter, prefix_ids_BP, images) -> bool:
    """Whether every row's cached prefix holds its whole image span: its closing token, or all its image tokens."""
    end = _image_end_id(adapter)
    if end is not None:
        return bool((prefix_ids_BP == end).any(1).all())
    counts = (prefix_ids_BP == adapter.image_token_id).sum(1).tolist()
    return counts == [image.num_tokens for image in images]


@pytest.mark.parametrize("model_type", MOVING_FAMILIES)
@pytest.mark.parametrize("decoding", [None, Decoding()], ids=["transformers", "static"])
def test_locating_from_the_scored_image_prefix_equals_a_fresh_prefill(tiny_checkpoint, model_type, decoding):
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    model.eval()
    # As in the trainer, the last pass before locating is the scoring pass over other rows, in another order: a
    # position state that transformers keeps from the last prefill (Qwen2 families' rope offset) is that batch's.
    scored, images = _scored_and_located_rows(model, adapter)
    widths = _ForwardWidths(model)
    resumed = locate_from_prefix(model, adapter, images, CAPTIONS, GREEDY, scored, SOURCE_ROWS, decoding)
    widths.handle.remove()
    prompts = [adapter.locator_prompt(c, im) for c, im in zip(CAPTIONS, images)]
    shared = shared_prefix_batch(model, adapter, scored, SOURCE_ROWS, prompts, images)
    prefix_ids = shared.batch.input_ids[:, : shared.columns]
    assert _holds_whole_image_spans(adapter, prefix_ids, images), "the whole image span comes from the cache"
    prefix_lengths = shared.batch.inputs["attention_mask"][:, : shared.columns].sum(1)
    if model_type not in ONE_SPAN_LENGTH:
        assert len(set(prefix_lengths.tolist())) > 1, "the test needs rows whose shared prefixes differ in length"
    assert widths.widths[0] == shared.batch.input_ids.shape[1] - shared.columns, "only the captions are prefilled"

    assert_prefix_batch_decodes_as_a_prefill(model, adapter, prompts, images, shared)
    assert resumed == locate(model, adapter, images, CAPTIONS, GREEDY)


def _cropped(scored: ScoredPrompts, columns: int) -> ScoredPrompts:
    """``scored`` with its cache cut to its first ``columns`` columns (in place)."""
    scored.cache.crop(columns - scored.cache.get_seq_length())  # transformers' crop takes how many to remove
    return ScoredPrompts(scored.batch, scored.cache, columns)


def test_a_longer_prefix_than_another_source_row_holds_is_exact(tiny_checkpoint):
    # The batch's prefix block is as wide as its longest shared prefix; a row whose scored prompt is shorter than
    # that block reads its source's cached columns only up to the end of the cache (the rest is masked).
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen"))
    model.eval()
    scored, images = _scored_and_located_rows(model, adapter)
    starts = (scored.batch.inputs["attention_mask"] == 0).sum(1).tolist()
    late, early = starts.index(max(starts)), starts.index(min(starts))
    assert starts[late] > starts[early], "the test needs a later-starting scored prompt"
    captions, source_rows = ["a", "This red circle"], [late, early]  # "This": one more token shared (8 against 7)
    located_images = [images[SOURCE_ROWS.index(r)] for r in source_rows]
    columns = starts[late] + 7  # the later row's cache ends right after its shared prefix
    tight = _cropped(scored, columns)
    prompts = [adapter.locator_prompt(c, im) for c, im in zip(captions, located_images)]
    shared = shared_prefix_batch(model, adapter, tight, source_rows, prompts, located_images)
    assert shared is not None and shared.columns == 8 and starts[late] + shared.columns > columns
    resumed = locate_from_prefix(model, adapter, located_images, captions, GREEDY, tight, source_rows)
    assert resumed == locate(model, adapter, located_images, captions, GREEDY)


def test_a_cache_that_ends_inside_a_rows_common_prefix_gives_it_only_the_cached_columns(tiny_checkpoint):
    # Two locator rows from one left-padded scored row whose cache ends one column before the longer of their common
    # prefixes ("This" after the image span): that row shares only the cached columns (counted from the row's first,
    # past its padding) and prefills the rest, never reading a key past the cache's end.
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen"))
    model.eval()
    scored, images = _scored_and_located_rows(model, adapter)
    starts = (scored.batch.inputs["attention_mask"] == 0).sum(1).tolist()
    source = starts.index(max(starts))  # a left-padded row: its cached columns start after its padding
    assert starts[source] > 0, "the test needs a left-padded scored row"
    captions, source_rows = ["a", "This red circle"], [source, source]  # 7 and 8 columns in common with the source
    located_images = [images[SOURCE_ROWS.index(source)]] * 2
    prompts = [adapter.locator_prompt(c, im) for c, im in zip(captions, located_images)]
    assert shared_prefix_batch(model, adapter, scored, source_rows, prompts, located_images).columns == 8
    columns = starts[source] + 7
    tight = _cropped(scored, columns)
    shared = shared_prefix_batch(model, adapter, tight, source_rows, prompts, located_images)
    assert shared is not None and shared.columns == 7 and shared.cache.get_seq_length() == 7
    assert_prefix_batch_decodes_as_a_prefill(model, adapter, prompts, located_images, shared)
    resumed = locate_from_prefix(model, adapter, located_images, captions, GREEDY, tight, source_rows)
    assert resumed == locate(model, adapter, located_images, captions, GREEDY)


def test_a_prefix_is_moved_only_where_the_scored_and_every_locator_prompt_fit_dynamic_ntks_window(tiny_checkpoint):
    # Qwen-VL's dynamic NTK rotates the keys of a sequence longer than ``seq_length`` by another base, so cached keys
    # move only where the scored prompts and the longest locator prompt both fit: one token over, a full prefill.
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen"))
    model.eval()
    scored, images = _scored_and_located_rows(model, adapter)
    scored_length = scored.columns + 1
    short = ["a", "red"]
    long = ["a", "the small blue square at the top left of the picture, left of a red circle"]
    for captions in (short, long):
        prompts = [adapter.locator_prompt(c, im) for c, im in zip(captions, images[:2])]
        lengths = [len(adapter.encode_prompt(p, im)) for p, im in zip(prompts, images[:2])]
        longest = max(scored_length, *lengths)
        # short: the scored prompts are the longest; long: one locator prompt is, and the other is shorter than both
        assert (longest == scored_length) == (captions is short) and min(lengths) < scored_length
        for seq_length, moved in ((longest, True), (longest - 1, False)):
            model.config.seq_length = seq_length
            shared = shared_prefix_batch(model, adapter, scored, SOURCE_ROWS[:2], prompts, images[:2])
            assert (shared is not None) == moved, (captions, seq_length)


def test_a_cached_prefix_that_would_cut_the_image_span_is_not_used(tiny_checkpoint):
    # With only part of the image span cached, the rest of it would need the image again: full prefill instead.
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen"))
    model.eval()
    scored, images = _scored_and_located_rows(model, adapter)
    prompts = [adapter.locator_prompt(c, im) for c, im in zip(CAPTIONS, images)]
    assert shared_prefix_batch(model, adapter, scored, SOURCE_ROWS, prompts, images) is not None
    first = int((scored.batch.inputs["attention_mask"] == 0).sum(1).max())  # the latest-starting scored prompt
    halfway = ScoredPrompts(scored.batch, scored.cache, first + adapter.tokenizer.image_token_span // 2)
    assert shared_prefix_batch(model, adapter, halfway, SOURCE_ROWS, prompts, images) is None


def test_families_that_do_not_move_cached_columns_locate_from_a_full_prefill(tiny_checkpoint):
    # GLM-4.1V has M-RoPE too, but its adapter has not opted in (no test shows its moved keys exact), nor in resuming
    # the greedy captions from the scoring pass's cache: the base adapter's fallback, a full prefill, for both.
    model, adapter = load_model_and_adapter(tiny_checkpoint("glm4v"))
    model.eval()
    assert not adapter.resumes_from_scoring_cache(model, 40, 50)
    scored, images = _scored_and_located_rows(model, adapter)
    assert locate_from_prefix(model, adapter, images, CAPTIONS, GREEDY, scored, SOURCE_ROWS) is None


def test_a_qwen2_checkpoint_with_sliding_window_layers_prefills_in_full(tiny_checkpoint, tmp_path):
    """``use_sliding_window`` (off in the released Qwen2/2.5-VL checkpoints): a window layer's cache keeps only its
    last columns, so the scoring pass's cache can be neither cropped back to the prompts (transformers refuses the
    crop: the run would stop) nor cut to their image prefix. Such a model prefills its prompts in full, in every
    describer rollout, on both decoders."""
    import json
    import shutil

    folder = tmp_path / "windowed"
    shutil.copytree(tiny_checkpoint("qwen2_5_vl"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None)
    (folder / "config.json").write_text(json.dumps(config))
    model, adapter = load_model_and_adapter(str(folder))
    assert "sliding_attention" in model.config.get_text_config(decoder=True).layer_types
    assert not adapter.resumes_from_scoring_cache(model, 40, 50)
    assert not adapter.moves_cached_prompt_columns(model, 40)
    for fused in (False, True):
        _, resumed, located, scored = _losses_and_resumed_calls(str(folder), tmp_path, True, lora=fused, fused=fused)
        assert len(resumed) >= 2 and resumed == located == scored == [False] * len(resumed), (fused, resumed, located,
                                                                                         scored)


@pytest.mark.parametrize("model_type", ["aya_vision", "gemma3", "exaone4_5"])
def test_window_layers_resume_only_below_their_window_and_never_move(tiny_checkpoint, tmp_path_factory, model_type):
    """A window layer keeps its last ``window - 1`` columns: the scoring cache crops back to the prompts only while it
    holds them all (transformers refuses the crop after), and no prefix moves into a batch of other columns."""
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))  # window 64
    assert adapter.resumes_from_scoring_cache(model, 40, 63)
    assert not adapter.resumes_from_scoring_cache(model, 40, 64)
    assert not adapter.moves_cached_prompt_columns(model, 10)
    wide, _ = load_model_and_adapter(_checkpoint(tiny_checkpoint, tmp_path_factory, model_type))
    assert not adapter.moves_cached_prompt_columns(wide, 10)


@pytest.mark.parametrize("model_type", ["minicpmv4_6", "granite4_vision", "gemma4"])
def test_families_whose_caches_cannot_be_reused_refuse_both(tiny_checkpoint, model_type):
    # MiniCPM-V 4.6: Qwen3.5's recurrent state; Granite 4 Vision: no cache from a forward; Gemma 4: not verified.
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    assert not adapter.resumes_from_scoring_cache(model, 10, 20)
    assert not adapter.moves_cached_prompt_columns(model, 10)


def test_a_cache_of_the_wrong_length_is_refused(tiny_checkpoint):
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen"))
    model.eval()
    images, boxes = sample_images(adapter, n=2)
    batch, sampled = describe(model, adapter, images, boxes, SAMPLED)
    cache = _scored_prompt_cache(model, adapter, batch, sampled)
    cache.crop(-1)
    with pytest.raises(ValueError, match="prompt_cache holds"):
        generate(model, adapter, batch, GREEDY, skip_special_tokens=True, prompt_cache=cache)


def test_a_fused_prompt_cache_of_the_wrong_length_is_refused_before_the_snapshot_scores(tiny_checkpoint, tmp_path):
    # The scoring pass reads only the captions from the fused loop's cache: a cache one column short would shift every
    # caption token's position. The message quotes both lengths.
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_5_vl"))
    model.eval()
    images, boxes = sample_images(adapter, n=2)
    batch, sampled = describe(model, adapter, images, boxes, SAMPLED)
    width = batch.inputs["input_ids"].shape[1]
    short = _scored_prompt_cache(model, adapter, batch, sampled)
    short.crop(-1)
    greedy = Completions(sampled.ids_BT, sampled.mask_BT, sampled.texts, short)
    cycle = RolloutCycle(adapter, SCTuneConfig(output_dir=str(tmp_path), **FAST))
    with pytest.raises(ValueError, match=f"kept {width - 2} prompt columns; the sampled captions' prompts have "
                                         f"{width - 1} before their last"):
        cycle.score_with_snapshot(SampledCaptions(batch, sampled, greedy), keep_prompts=True)


class _PrefixCheckingCycle(RecordingCycle):
    def locate_from_prefix(self, model, images, captions, scored, source_rows):
        # The scoring pass's cache holds the prompts, all but their last column (and past them, after the greedy
        # captions decoded from it, their columns): ``columns`` says where the prompts' part ends.
        assert scored.columns == scored.batch.inputs["input_ids"].shape[1] - 1 <= scored.cache.get_seq_length()
        found = super().locate_from_prefix(model, images, captions, scored, source_rows)
        if found is not None:  # the test reward ignores boxes, so compare the locator's raw answers here
            assert found == locate(model, self.adapter, images, captions, self.greedy_boxes), "differs from a prefill"
        return found


def _losses_and_resumed_calls(checkpoint, tmp_path, prompt_cache: bool, lora=False, checkpointing=False, k=1,
                              fused=False):
    """The four steps' losses, and per describer rollout whether its greedy captions and its locating resumed
    from the scoring pass's cache: the trainer's logged ``describer/prompt_cache`` and
    ``describer/locating_prefix_cache``, checked against what the cycle really handed ``generate`` and what
    ``locate_from_prefix`` really did; and whether the scoring pass started from the fused loop's cache
    (``describer/scoring_prompt_cache``)."""
    decoding = {"static_decoding": "true", "fused_decoding": "true"} if fused else {}
    trainer, losses = two_phase_trainer(checkpoint, str(tmp_path / f"{prompt_cache}_{lora}_{checkpointing}_{k}_{fused}"),
                                        model_transform=small_lora if lora else None, num_generations=k,
                                        snapshot_prompt_cache=prompt_cache, gradient_checkpointing=checkpointing,
                                        cycle=_PrefixCheckingCycle, **decoding)
    trainer.train()
    handed, prefixed = trainer.cycle.handed_cache, trainer.cycle.from_prefix
    logged = [entry for entry in trainer.state.log_history if "describer/prompt_cache" in entry]
    resumed = [entry["describer/prompt_cache"] == 1.0 for entry in logged]
    located = [entry["describer/locating_prefix_cache"] == 1.0 for entry in logged]
    assert [r for r in resumed if r] == [h for h in handed if h], "the logged metric says what generate was given"
    assert [r for r in located if r] == [p for p in prefixed if p], "the logged metric says how locating ran"
    scored = [entry["describer/scoring_prompt_cache"] == 1.0 for entry in logged]
    return losses, resumed, located, scored


# LoRA with gradient checkpointing is the GPU recipe: the snapshot (the policy's modules, another adapter) must
# still keep its scoring pass's cache there, which it can only in eval mode. With K = 2 samples per box the greedy
# captions prefill again (their prompts are not the samples' batch), but locating still resumes. Fused (LoRA): the
# greedy captions come from the sampling loop, which keeps their prompts' cache for the scoring pass.
@pytest.mark.parametrize(
    "model_type,lora,checkpointing,k,fused",
    [("qwen", False, False, 1, False), ("qwen", True, False, 1, False), ("qwen", True, True, 1, False),
     ("qwen", False, False, 2, False), ("qwen2_5_vl", False, False, 1, False), ("qwen2_5_vl", True, True, 1, False),
     ("qwen", True, True, 1, True), ("qwen2_5_vl", True, True, 1, True), ("llava_next", False, False, 1, False),
     ("llava_next", True, True, 1, True)],
)
def test_training_losses_identical_with_and_without_the_prompt_cache(
    tiny_checkpoint, tmp_path, model_type, lora, checkpointing, k, fused
):
    checkpoint = tiny_checkpoint(model_type)
    plain, *plain_calls = _losses_and_resumed_calls(checkpoint, tmp_path, False, lora, checkpointing, k, fused)
    cached, resumed, located, scored = _losses_and_resumed_calls(checkpoint, tmp_path, True, lora, checkpointing, k,
                                                                 fused)
    assert plain_calls == [[False, False]] * 3
    assert resumed == [k == 1 and not fused] * 2 and located == [True, True] and scored == [fused] * 2
    assert len(plain) == 4 and all(loss != 0 for loss in plain)
    assert cached == pytest.approx(plain, abs=1e-5)


@pytest.mark.parametrize("fused_decoding", ["false", "true"])
def test_the_snapshot_never_scores_from_a_cache_of_the_policys_prompts(tiny_checkpoint, tmp_path, fused_decoding):
    # With the policy's greedy baseline and one sample per box, the policy's greedy rows (their own call, or the
    # sampling loop's) hold exactly the prompts the snapshot then scores: a cache of them kept (a greedy call keeping
    # its prompts by default) would pass the scoring pass's length check and hand it the policy's keys. The second
    # rollout is the one that can tell: the policy has had one update since the snapshot was synced.
    trainer, losses = two_phase_trainer(
        tiny_checkpoint("qwen2_5_vl"), str(tmp_path), describer_baseline="policy_greedy", describer_update_steps=2,
        ppo_epochs=1, max_steps=2, snapshot_prompt_cache=True, fused_decoding=fused_decoding, cycle=RecordingCycle)
    trainer.train()
    assert trainer.cycle.fused_greedy == ("policy" if fused_decoding == "true" else None)
    assert len(losses) == 2 and all(loss != 0 for loss in losses)
    logged = [entry for entry in trainer.state.log_history if "describer/scoring_prompt_cache" in entry]
    assert [entry["describer/scoring_prompt_cache"] for entry in logged] == [0.0, 0.0]
    fused = float(fused_decoding == "true")  # the policy's own greedy rows in its sampling loop, or a call of their own
    assert [entry["describer/fused_decoding"] for entry in logged] == [fused, fused]
    rollouts = [result.rollout for _, result in trainer.cycle.made]
    # The share of captions whose hashed reward differs from their greedy caption's: rewards below 1 apart count too.
    differs = [float((r.reward_N != r.baseline_N).float().mean()) for r in rollouts]
    assert [entry["describer/nonzero_advantage"] for entry in logged] == pytest.approx(differs) and max(differs) > 0
    second = rollouts[1]
    assert (second.old_logp_NT - second.snapshot_logp_NT).abs().max() > 1e-3, "the policy has moved"
    with trainer.snapshot.scoring() as snapshot:  # no phase switch in two steps: still the weights it scored with
        for rollout in rollouts:
            fresh = caption_logprobs(snapshot, rollout.inputs, rollout.caption_ids_NT,
                                     trainer.args.describer_temperature).logp_NT
            assert torch.allclose(rollout.snapshot_logp_NT, fresh, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen4_exp"])
def test_families_that_do_not_opt_in_prefill_again(tiny_checkpoint, tmp_path, model_type):
    # The linear-attention layers (Qwen3.5's, Qwen4-Exp's) keep a recurrent state that cannot be cropped back to the
    # prompt (nor can Qwen4-Exp's n-gram embedding's last token ids).
    _, *calls = _losses_and_resumed_calls(tiny_checkpoint(model_type), tmp_path, True)
    assert calls == [[False, False]] * 3


def test_no_reuse_where_dynamic_ntk_would_scale_the_scored_sequence(tiny_checkpoint):
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen"))
    freeze_vision_tower(model, adapter)
    seq_length = model.config.seq_length
    assert adapter.resumes_from_scoring_cache(model, seq_length - 10, seq_length)
    assert not adapter.resumes_from_scoring_cache(model, seq_length - 10, seq_length + 10)
    assert adapter.moves_cached_prompt_columns(model, seq_length)
    assert not adapter.moves_cached_prompt_columns(model, seq_length + 10)


def test_the_rollouts_ask_about_the_whole_call_before_keeping_a_prompt_cache(tiny_checkpoint):
    """A kept prompt cache serves a later pass over prompt + caption: the question the rollouts put to the family is
    about that length (the prompt plus the caption budget). Dynamic NTK one column short of it: nothing kept."""
    model, adapter = two_adapter_model(tiny_checkpoint, "qwen")
    images, boxes = sample_images(adapter, n=2)
    with row_adapters(model, [("default", 0, 2)]):
        width = describe(model, adapter, images, boxes, GREEDY)[0].input_ids.shape[1]
    call = width + GREEDY.max_new_tokens
    assert SAMPLED.max_new_tokens == GREEDY.max_new_tokens
    for seq_length, kept in ((call - 1, False), (call, True)):
        model.config.seq_length = seq_length
        with row_adapters(model, [("default", 0, 2)]):
            captions = describe(model, adapter, images, boxes, GREEDY, keep_prompts=True)[1]
        assert (captions.prompt_cache is not None) == kept, seq_length
        with row_adapters(model, [("default", 0, 2), ("snapshot", 2, 4)]):  # the budget is the sampled captions'
            _, _, greedy = describe_with_greedy(model, adapter, images, boxes, images, boxes, SAMPLED, GREEDY,
                                                keep_greedy_prompts=True)
        assert (greedy.prompt_cache is not None) == kept, seq_length


@pytest.mark.parametrize("model_type", ["qwen", "qwen2_5_vl", "qwen3_vl", "llava_next", "gemma3", "exaone4_5"])
@pytest.mark.parametrize("decoding", [None, Decoding()], ids=["dynamic", "static"])
def test_scoring_from_the_fused_loops_snapshot_prompts_equals_a_full_pass(tiny_checkpoint, model_type, decoding):
    # LoRA, one sample per box: the fused loop's greedy rows (the snapshot's adapter) prefill exactly the prompts the
    # snapshot's scoring pass reads next; it starts from their cache and reads only the captions. Run first, after
    # the fused call's prefill of twice as many rows: a position state kept from that prefill would not fit.
    model, adapter = two_adapter_model(tiny_checkpoint, model_type)
    images, boxes = sample_images(adapter, widened=1)
    n = len(images)
    with row_adapters(model, [("default", 0, n), ("snapshot", n, 2 * n)]):
        batch, sampled, greedy = describe_with_greedy(model, adapter, images, boxes, images, boxes, SAMPLED, GREEDY,
                                                      decoding, keep_greedy_prompts=True)
    width = batch.inputs["input_ids"].shape[1]
    assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "the test needs left padding"
    assert greedy.prompt_cache is not None and greedy.prompt_cache.get_seq_length() == width - 1
    teacher = adapter.append_completion(batch, sampled.ids_BT, sampled.mask_BT)
    spare = copy.deepcopy(greedy.prompt_cache)  # a pass extends the cache it is given
    with active_adapter(model, "snapshot"):
        widths = _ForwardWidths(model)
        resumed = caption_logprobs(model, uncached_inputs(model, adapter, teacher, batch.images, width - 1),
                                   sampled.ids_BT, 1.0, keep_cache=True, prompt_cache=greedy.prompt_cache)
        widths.handle.remove()
        unkept = caption_logprobs(model, uncached_inputs(model, adapter, teacher, batch.images, width - 1),
                                  sampled.ids_BT, 1.0, keep_cache=False, prompt_cache=spare)
        # The trainer's full pass where its cache serves locating: at generate's positions (scoring_inputs).
        full = caption_logprobs(model, scoring_inputs(model, adapter, teacher), sampled.ids_BT, 1.0, keep_cache=True)
    assert widths.widths == [1 + sampled.ids_BT.shape[1]], "only the last prompt column and the captions are read"
    torch.testing.assert_close(resumed.logp_NT, full.logp_NT, rtol=0, atol=1e-5)
    assert unkept.cache is None
    torch.testing.assert_close(unkept.logp_NT, full.logp_NT, rtol=0, atol=1e-5)
    # The pass's cache, prompt and captions, serves locating as a full pass's would.
    for kept, fresh in zip(resumed.cache.layers, full.cache.layers, strict=True):
        torch.testing.assert_close(kept.keys, fresh.keys, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_5_vl"])
def test_a_resumed_pass_gets_its_per_token_fields_cut_to_the_columns_it_reads(tiny_checkpoint, model_type):
    # Gemma 3's token_type_ids (its image tokens' bidirectional mask), the M-RoPE families' mm_token_type_ids: a field
    # with one entry per token must line up with the input_ids the pass reads, the columns after the cached ones.
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    model.eval()
    (key,) = adapter.per_token_keys
    images, boxes = sample_images(adapter, n=2)
    batch, sampled = describe(model, adapter, images, boxes, SAMPLED)
    teacher = adapter.append_completion(batch, sampled.ids_BT, sampled.mask_BT)
    assert key in teacher and teacher[key].any(), "the test needs the field, marking the image tokens"
    cached = batch.inputs["input_ids"].shape[1] - 1
    resumed = uncached_inputs(model, adapter, teacher, batch.images, cached)
    assert torch.equal(resumed["input_ids"], teacher["input_ids"][:, cached:])
    assert torch.equal(resumed[key], teacher[key][:, cached:])
    assert torch.equal(resumed["attention_mask"], teacher["attention_mask"])  # the mask covers the cache too


def test_a_cache_of_recurrent_layers_cannot_be_cut_to_prompt_rows(tiny_checkpoint):
    # Qwen3.5's linear-attention layers keep a recurrent state, not one key and value per column: no columns to keep.
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen3_5"))
    model.eval()
    images, boxes = sample_images(adapter, n=2)
    batch, _ = describe(model, adapter, images, boxes, GREEDY)
    with torch.no_grad():
        cache = model(**batch.inputs, use_cache=True).cache
    assert "LinearAttentionLayer" in {type(layer).__name__ for layer in cache.layers}
    with pytest.raises(ValueError, match="only key/value caches of attention layers can be cut to some columns"):
        prompt_rows_cache(cache, 0, 1, 3)


def test_the_fused_loop_keeps_no_prompt_cache_where_the_family_cannot_resume(tiny_checkpoint):
    model, adapter = two_adapter_model(tiny_checkpoint, "qwen3_5")  # Gated DeltaNet: a recurrent state, no columns
    images, boxes = sample_images(adapter, n=2)
    with row_adapters(model, [("default", 0, 2), ("snapshot", 2, 4)]):
        _, _, greedy = describe_with_greedy(model, adapter, images, boxes, images, boxes, SAMPLED, GREEDY,
                                            keep_greedy_prompts=True)
    assert greedy.prompt_cache is None


@pytest.mark.parametrize("model_type", ["qwen", "qwen2_5_vl", "llava_next"])
def test_captions_keep_their_prompts_cache_for_locating_from_the_image_prefix(tiny_checkpoint, model_type):
    # The pseudo-label filter's path (transformers' own generate on CPU): the greedy-caption call keeps its prompts'
    # cache, and the captions are located from their image prefix exactly as from a fresh prefill.
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    model.eval()
    images, boxes = sample_images(adapter, widened=1)
    batch, captions = describe(model, adapter, images, boxes, GREEDY, keep_prompts=True)
    width = batch.inputs["input_ids"].shape[1]
    assert captions.prompt_cache is not None and captions.prompt_cache.get_seq_length() == width - 1
    scored = ScoredPrompts(batch, captions.prompt_cache, width - 1)
    rows = list(range(len(images)))
    resumed = locate_from_prefix(model, adapter, images, captions.texts, GREEDY, scored, rows)
    assert resumed is not None and resumed == locate(model, adapter, images, captions.texts, GREEDY)
    assert describe(model, adapter, images, boxes, GREEDY)[1].prompt_cache is None  # kept only when asked



@pytest.mark.parametrize("snapshot_prompt_cache", [True, False])
def test_the_policys_update_reads_the_rows_where_the_snapshot_scored_them(tiny_checkpoint, tmp_path,
                                                                         snapshot_prompt_cache):
    # Right after the sync the policy and the snapshot are the same weights, so the policy's first log-probs (the PPO
    # update's old log-probs) equal the snapshot's to the bit only where both passes read each left-padded row at the
    # same positions. A 1-D rotary family's scoring pass reads them at generate's unpadded positions (the cache it
    # keeps needs them); a plain forward would count the padding. Rotation is relative, so only rounding tells them
    # apart: a widened photo (more anyres tiles) pads the other rows by dozens of columns to make it show.
    from PIL import Image

    from sc_tune.data import ReferringDataset

    photo = Image.open(os.path.join(SAMPLE_IMAGES, "images", "000.png"))
    photo.resize((photo.width * 4, photo.height)).save(tmp_path / "wide.png")
    photo.save(tmp_path / "plain.png")
    records = [{"image": name, "bbox": [0.1, 0.2, 0.6, 0.7]} for name in ("wide.png", "plain.png") * 2]
    (tmp_path / "records.json").write_text(json.dumps(records))
    dataset = ReferringDataset.from_file(str(tmp_path / "records.json"), str(tmp_path))
    trainer, _ = two_phase_trainer(tiny_checkpoint("llava_next"), str(tmp_path / "run"), dataset=dataset, max_steps=1,
                                   snapshot_prompt_cache=snapshot_prompt_cache)
    seen = []
    set_advantages = trainer._set_advantages

    def record(rollout):
        seen.append((rollout.inputs["attention_mask"].sum(1), rollout.old_logp_NT, rollout.snapshot_logp_NT))
        set_advantages(rollout)

    trainer._set_advantages = record
    trainer.train()
    ((lengths_B, policy_logp_NT, snapshot_logp_NT),) = seen
    assert int(lengths_B.max() - lengths_B.min()) > 10, "the test needs rows padded by many columns"
    assert torch.equal(policy_logp_NT, snapshot_logp_NT)
