"""Rollout decoding (``sc_tune.decoding``): the static-cache loop decodes what transformers' ``generate`` decodes.

Pinned here, on CPU: greedy and sampled tokens equal transformers' ``generate`` (dynamic cache, same seed) for every
family, with every step's logits within 1e-5; the same from a handed-in prompt cache (the snapshot's scoring pass)
and for locating from a moved image prefix; one loop of sampled and greedy rows (per-row LoRA adapters)
equals the separate calls; noise blocks sample each block as its own call would; the decode step traces as one
graph that does not change between steps (the CPU stand-in for CUDA graph capture, which replays one recorded step);
refusals name the family and the reason.
"""

import pytest
import torch
import torch._dynamo
from peft.tuners.lora import Linear as LoraLinear
from transformers import AttentionInterface
from transformers.cache_utils import StaticCache
from transformers.integrations import sdpa_attention
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import sc_tune.decoding as decoding
import sc_tune.rollout as rollout
from sc_tune.decoding import Decoding, SampledRows, choose_decoding
from sc_tune.modeling import load_model_and_adapter
from sc_tune.prompt_cache import ScoredPrompts, keep_prompt_columns, scoring_inputs
from sc_tune.rollout import GenerationSettings, describe, describe_with_greedy, generate, locate, locate_from_prefix
from sc_tune.snapshot import _StackedRowTerms, active_adapter, row_adapters
from tests.helpers import sample_images, small_lora, two_adapter_model

STATIC = Decoding(static_cache=True)
GREEDY = GenerationSettings(max_new_tokens=6, min_new_tokens=2)
SAMPLED = GenerationSettings(max_new_tokens=6, min_new_tokens=2, do_sample=True, top_k=50, top_p=0.9)

# One model type per registered family (tests/test_families.py checks the registry covers them all), but
# Qwen3.8-Flash-Next (qwen4_exp), refused by name (test_sparse_attention_layers_are_refused_by_name_...).
FAMILY_TYPES = ["qwen", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v", "exaone4_5", "hyperclovax_vision_v2",
                "video_llama_3", "cohere_compass",
                "internvl", "llava_onevision", "llava", "llava_next", "mistral3", "aya_vision", "granite4_vision",
                "mllama", "idefics2", "smolvlm", "gemma3", "gemma4", "minicpmv4_6", "minicpmv4_7", "ovis2"]


def _model(tiny_checkpoint, model_type):
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "sliding_window", None):
        # The tiny Gemmas' 64-token windows are shorter than their prompts (a call that does not fit decodes with a
        # dynamic cache); real windows (512-1024) cover a rollout. Widen them so the static path runs.
        text.sliding_window = 4096
    return model.eval(), adapter


def _prompt_batch(adapter):
    images, boxes = sample_images(adapter)
    boxes[1] = [0.5, 0.5, 0.51, 0.52]  # other digits: prompts of different lengths, so rows are left-padded
    prompts = [adapter.describer_prompt(box, image) for box, image in zip(boxes, images)]
    return adapter.build_batch(prompts, images), images, boxes


class _Recorded:
    """Spies on one ``generate``: the caches the loop got, and every step's raw logits of either loop."""

    def __init__(self, monkeypatch, model):
        self.loop_logits, self.hf_logits, self.caches = [], [], []
        made = decoding.make_decode_loop

        def make(dec, blocks, keep_logits=False, logits=None, row_done=None):
            loop = made(dec, blocks, keep_logits=True, logits=self.loop_logits, row_done=row_done)

            def spy(model, input_ids, *args, **kwargs):
                self.caches.append(kwargs.get("cache"))
                return loop(model, input_ids, *args, **kwargs)

            return spy

        monkeypatch.setattr(rollout, "make_decode_loop", make)
        plain = model.generate

        def hf_generate(*args, **kwargs):
            if "custom_generate" in kwargs:
                return plain(*args, **kwargs)
            out = plain(*args, **kwargs, return_dict_in_generate=True, output_logits=True)
            self.hf_logits.extend(out.logits)
            return out.sequences

        monkeypatch.setattr(model, "generate", hf_generate)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_static_decoding_equals_transformers_generate(tiny_checkpoint, monkeypatch, model_type):
    model, adapter = _model(tiny_checkpoint, model_type)
    assert adapter.static_decoding_problem(model) is None
    batch, _, _ = _prompt_batch(adapter)
    assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "the test needs left padding"
    spy = _Recorded(monkeypatch, model)
    for settings in (GREEDY, SAMPLED):
        spy.loop_logits.clear(), spy.hf_logits.clear(), spy.caches.clear()
        torch.manual_seed(1)
        expected = generate(model, adapter, batch, settings, skip_special_tokens=True)
        torch.manual_seed(1)
        got = generate(model, adapter, batch, settings, skip_special_tokens=True, decoding=STATIC)
        assert isinstance(spy.caches[0], StaticCache), "the static path did not run"
        assert torch.equal(got.ids_BT, expected.ids_BT) and got.texts == expected.texts, settings
        assert len(spy.loop_logits) == len(spy.hf_logits) == expected.ids_BT.shape[1]
        for step_loop, step_hf in zip(spy.loop_logits, spy.hf_logits, strict=True):
            torch.testing.assert_close(step_loop, step_hf, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen", "qwen2_5_vl", "llava_next", "ovis2"])
def test_static_decoding_resumes_from_the_scoring_cache(tiny_checkpoint, monkeypatch, model_type):
    """The snapshot's greedy captions from its scoring pass's cache (copied into the static cache): equal to a fresh
    prefill, every step's logits within float rounding, with the prompt really skipped; locating from the moved image
    prefix too."""
    model, adapter = _model(tiny_checkpoint, model_type)
    batch, images, boxes = _prompt_batch(adapter)
    _, sampled = describe(model, adapter, images, boxes, SAMPLED)
    width = batch.inputs["input_ids"].shape[1]

    def scored_cache():
        teacher = scoring_inputs(model, adapter, adapter.append_completion(batch, sampled.ids_BT, sampled.mask_BT))
        return keep_prompt_columns(model(**teacher, use_cache=True).cache, width)

    spy = _Recorded(monkeypatch, model)
    fresh = generate(model, adapter, batch, GREEDY, skip_special_tokens=True)
    widths, cache = [], scored_cache()
    handle = model.register_forward_pre_hook(lambda m, a, k: widths.append(k["input_ids"].shape[1]), with_kwargs=True)
    resumed = generate(model, adapter, batch, GREEDY, True, prompt_cache=cache, decoding=STATIC)
    handle.remove()
    assert widths[0] == 1, "decoding did not start from the cache"
    assert torch.equal(resumed.ids_BT, fresh.ids_BT)
    # Tokens alone miss a cache read at other positions than the fresh prefill's (a greedy argmax rarely flips).
    assert len(spy.loop_logits) == len(spy.hf_logits) == fresh.ids_BT.shape[1]
    for step_loop, step_hf in zip(spy.loop_logits, spy.hf_logits, strict=True):
        torch.testing.assert_close(step_loop, step_hf, rtol=0, atol=1e-5)
    captions, source_rows = ["the red circle", "a", "the small blue square at the top left", "red"], [0, 1, 2, 0]
    rows_images = [images[r] for r in source_rows]
    _, expected = locate(model, adapter, rows_images, captions, GREEDY)
    found = locate_from_prefix(model, adapter, rows_images, captions, GREEDY,
                               ScoredPrompts(batch, scored_cache(), width - 1), source_rows, decoding=STATIC)
    assert found is not None and found[1] == expected


def test_a_static_cache_resumes_only_from_a_cache_of_the_models_own_attention_layers(tiny_checkpoint):
    """A hybrid model's prompt cache holds recurrent states (Qwen3.5's linear-attention layers), which no column
    copy can move into a static cache; a cache of another model has other layers. Both are refused by name."""
    from transformers.cache_utils import DynamicCache

    from sc_tune.decoding import static_cache_from

    model, adapter = _model(tiny_checkpoint, "qwen3_5")
    batch, _, _ = _prompt_batch(adapter)
    with torch.no_grad():
        cache = model(**batch.inputs, use_cache=True).cache
    assert {type(layer).__name__ for layer in cache.layers} == {"LinearAttentionLayer", "DynamicLayer"}
    with pytest.raises(ValueError, match="only from a key/value cache of attention layers"):
        static_cache_from(cache, model.config, 64)
    other = DynamicCache()  # a key/value cache of one layer more than the model has
    for index in range(len(cache.layers) + 1):
        other.update(torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8), index)
    expected = rf"prompt cache has {len(other.layers)} layers, the model {len(cache.layers)}"
    with pytest.raises(ValueError, match=expected):
        static_cache_from(other, model.config, 64)


@pytest.mark.parametrize("model_type", ["qwen", "qwen2_5_vl", "mllama", "minicpmv4_7"])
@pytest.mark.parametrize("static", [True, False])
def test_one_loop_of_sampled_and_greedy_rows_equals_the_separate_calls(tiny_checkpoint, model_type, static):
    """The policy's samples (adapter "default") and the snapshot's greedy captions (adapter "snapshot") decoded in
    one loop: sampled rows equal a separate sampled call with the same seed, greedy rows a separate greedy call."""
    model, adapter = two_adapter_model(tiny_checkpoint, model_type)
    images, boxes = sample_images(adapter)
    dec = Decoding(static_cache=static)
    torch.manual_seed(5)
    with active_adapter(model, "default"):
        _, sampled = describe(model, adapter, images, boxes, SAMPLED)
    with active_adapter(model, "snapshot"):
        _, greedy = describe(model, adapter, images, boxes, GREEDY)
    with active_adapter(model, "default"):
        _, policy_greedy = describe(model, adapter, images, boxes, GREEDY)
    assert not torch.equal(greedy.ids_BT, policy_greedy.ids_BT), "the adapters must differ for the test to mean much"
    torch.manual_seed(5)
    decoding.STATS.pop()
    with row_adapters(model, [("default", 0, 3), ("snapshot", 3, 6)]):
        batch, fused_sampled, fused_greedy = describe_with_greedy(
            model, adapter, images, boxes, images, boxes, SAMPLED, GREEDY, dec
        )
    stats = decoding.STATS.pop()
    assert stats.calls == 1 and stats.rows == 6  # one loop for both kinds of rows
    assert torch.equal(fused_sampled.ids_BT, sampled.ids_BT) and fused_sampled.texts == sampled.texts
    assert torch.equal(fused_greedy.ids_BT, greedy.ids_BT) and fused_greedy.texts == greedy.texts
    assert batch.inputs["input_ids"].shape[0] == 3  # the samples' own prompt batch, for the scoring pass


def test_one_loop_of_sampled_and_greedy_rows_refuses_what_it_cannot_decode_as_one(tiny_checkpoint):
    """Before any decoding: other caption limits for the two kinds of rows (one loop has one), sample blocks that reach
    past the sampled rows (into the greedy ones, or before row 0), and a kept greedy-prompt cache for prompts that are
    not the sampled rows' (a pass over the sampled batch could not start from it); and in the loop itself, sampled
    rows in a greedy call (no warpers to sample with)."""
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_5_vl"))
    images, boxes = sample_images(adapter)
    batch = adapter.build_batch([adapter.describer_prompt(b, im) for b, im in zip(boxes, images)], images)
    with pytest.raises(ValueError, match=r"sampled rows need a sampling call \(do_sample=True\)"):
        model.generate(**batch.inputs, max_new_tokens=3, do_sample=False,
                       custom_generate=decoding.make_decode_loop(STATIC, [SampledRows(0, 1)]))
    shorter = GenerationSettings(max_new_tokens=5, min_new_tokens=2)
    with pytest.raises(ValueError, match="the same caption length limits"):
        describe_with_greedy(model, adapter, images, boxes, images, boxes, SAMPLED, shorter)
    for blocks in ([SampledRows(0, 4)], [SampledRows(-1, 2)], [SampledRows(0, 2), SampledRows(2, 4)]):
        with pytest.raises(ValueError, match="reach outside the 3 sampled rows"):
            describe_with_greedy(model, adapter, images, boxes, images, boxes, SAMPLED, GREEDY, sample_blocks=blocks)
    with pytest.raises(ValueError, match="keep_greedy_prompts needs the greedy rows' prompts"):
        describe_with_greedy(model, adapter, images, boxes, images[:2], boxes[:2], SAMPLED, GREEDY,
                             keep_greedy_prompts=True)


class _ActiveDropoutThatKeepsAll(torch.nn.Dropout):
    """An active dropout (training mode, p > 0) as row_adapters sees it, that drops nothing: the per-block path runs
    and each row's term must still be its adapter's, scaling included."""

    def forward(self, x):
        return x


@pytest.mark.parametrize("dropout", ["off", "drops_all", "drops_none"])
@pytest.mark.parametrize("tiled", [False, True], ids=["a_bare_row", "equal_blocks"])
def test_row_adapters_give_each_row_its_adapters_logits(tiny_checkpoint, dropout, tiled):
    """Rows 0-1 with the policy's adapter, 2 with the snapshot's (whose scaling differs), 3 with none: each row's
    logits equal a forward of that row's batch with its adapter alone (the base model for row 3). With an active
    dropout the per-block path runs instead: of p = 1 (every LoRA input dropped, so no term at all), and one that
    drops nothing (each block's own term, as PEFT's). ``equal_blocks``: rows 2-3 both the snapshot's, so the blocks
    tile the call and the batched-matmul path runs."""
    model, adapter = two_adapter_model(tiny_checkpoint, "qwen2_5_vl")
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.scaling["snapshot"] *= 3.0
            for name in ("default", "snapshot"):
                if dropout == "drops_all":
                    module.lora_dropout[name] = torch.nn.Dropout(p=1.0).train()
                elif dropout == "drops_none":
                    module.lora_dropout[name] = _ActiveDropoutThatKeepsAll(p=0.5).train()
    images, boxes = sample_images(adapter, n=4)
    boxes[1] = [0.5, 0.5, 0.51, 0.52]  # prompts of different lengths: left-padded rows
    batch = adapter.build_batch([adapter.describer_prompt(b, im) for b, im in zip(boxes, images)], images)
    blocks = [("default", 0, 2), ("snapshot", 2, 4 if tiled else 3)]
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    stacked = _StackedRowTerms.for_layer(layer, blocks)
    assert (stacked is None) is (dropout != "off") and (stacked is None or stacked._tiled(4) is tiled)
    with torch.no_grad():
        expected = []
        for name in ("default", "default", "snapshot", "snapshot" if tiled else None):
            if name is None or dropout == "drops_all":
                with model.disable_adapter():
                    expected.append(model(**batch.inputs).logits)
            else:
                with active_adapter(model, name):
                    expected.append(model(**batch.inputs).logits)
        with row_adapters(model, blocks):
            got = model(**batch.inputs).logits
    for row in range(4):
        # The snapshot's scaling (x 3) is no power of two, so where it is applied changes the last bit: up to 2e-5
        # in these logits, depending on the adapters drawn; a wrong scaling or mask moves them by ~1.
        torch.testing.assert_close(got[row], expected[row][row], rtol=1e-5, atol=1e-4)
    if dropout != "drops_all":
        assert not torch.allclose(expected[0][2], expected[2][2], atol=1e-3), "the adapters must differ"
        assert not torch.allclose(expected[0][3], expected[3][3], atol=1e-3), "the adapter must differ from the base"


def test_row_adapters_refuse_an_adapter_that_is_missing_or_not_plain_lora(tiny_checkpoint):
    """Refused before any layer changes: the per-row terms are plain LoRA's formula only."""
    model, adapter = two_adapter_model(tiny_checkpoint, "qwen2_5_vl")
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    before = [layer._active_adapter for layer in layers]
    with pytest.raises(ValueError, match="adapter 'other' is missing or not plain LoRA"):
        with row_adapters(model, [("default", 0, 1), ("other", 1, 2)]):
            pass
    layers[-1].use_dora["snapshot"] = True  # DoRA in one layer: its magnitude vector is no plain LoRA term
    with pytest.raises(ValueError, match="adapter 'snapshot' is missing or not plain LoRA"):
        with row_adapters(model, [("default", 0, 1), ("snapshot", 1, 2)]):
            pass
    assert [layer._active_adapter for layer in layers] == before
    assert not any(layer._forward_hooks for layer in layers)
    base, _ = load_model_and_adapter(tiny_checkpoint("qwen2_5_vl"))
    with pytest.raises(ValueError, match="the model has no LoRA linear layer"):
        with row_adapters(base, [("default", 0, 1)]):
            pass
    # the blocks of a call with rows beyond the equal blocks do not tile it (its extra row gets no term)
    stacked = _StackedRowTerms.for_layer(layers[0], [("default", 0, 2), ("snapshot", 2, 4)])
    assert stacked._tiled(4) and not stacked._tiled(5) and not stacked._tiled(6)


def test_noise_blocks_sample_each_block_as_its_own_call(tiny_checkpoint):
    """Rows sampled from a block's generator do not depend on the other rows of the call: what lets a whole
    accumulation window roll out in one call and sample what per-micro-batch calls would."""
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    batch, images, boxes = _prompt_batch(adapter)
    seeds = [11, 12]
    blocks = [SampledRows(0, 2, torch.Generator().manual_seed(seeds[0])),
              SampledRows(2, 3, torch.Generator().manual_seed(seeds[1]))]
    together = generate(model, adapter, batch, SAMPLED, True, decoding=STATIC, sampled_rows=blocks)
    for (start, end), seed in zip([(0, 2), (2, 3)], seeds):
        alone_batch = adapter.build_batch(
            [adapter.describer_prompt(b, im) for b, im in zip(boxes[start:end], images[start:end])], images[start:end]
        )
        alone = generate(model, adapter, alone_batch, SAMPLED, True, decoding=STATIC,
                         sampled_rows=[SampledRows(0, end - start, torch.Generator().manual_seed(seed))])
        assert together.texts[start:end] == alone.texts
        torch.manual_seed(seed)  # one block on the global generator: transformers' own generate
        assert generate(model, adapter, alone_batch, SAMPLED, True).texts == alone.texts


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_the_shortest_budgets_decode_as_transformers_generate(tiny_checkpoint, budget):
    """One new token is the prefill's alone; two are the prefill's and one decode step: the loop's edge cases."""
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    batch, _, _ = _prompt_batch(adapter)
    settings = GenerationSettings(max_new_tokens=budget, min_new_tokens=1)
    expected = generate(model, adapter, batch, settings, skip_special_tokens=True)
    got = generate(model, adapter, batch, settings, skip_special_tokens=True, decoding=STATIC)
    assert expected.ids_BT.shape[1] == budget and torch.equal(got.ids_BT, expected.ids_BT)


def test_a_row_that_ends_first_writes_and_reads_the_pad_token_as_in_transformers(tiny_checkpoint):
    """Released tokenizers pad with a token far from id 0 (Qwen2.5-VL's <|endoftext|> is 151643), and so do the tiny
    ones (``sc_tune.tiny.chat.build_tokenizer``): at id 0 a finished row written as -pad, or as 0, would look right.
    Row 0 ends after two tokens (its second greedy token made the end token): each later step writes the pad into
    that row and feeds it back, as transformers' loop does (a negative id would fail the embedding)."""
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    batch, _, _ = _prompt_batch(adapter)
    width = batch.inputs["input_ids"].shape[1]
    common = {"max_new_tokens": 6, "min_new_tokens": 0, "do_sample": False, "pad_token_id": adapter.pad_token_id}
    free = model.generate(**batch.inputs, **common, eos_token_id=adapter.end_token_ids)
    end = int(free[0, width + 1])
    assert int(free[0, width]) != end and all(end not in free[row, width:].tolist() for row in (1, 2)), \
        "only row 0 may end, at its second token"
    pad = adapter.pad_token_id
    assert pad not in (0, end)
    settings = {**common, "eos_token_id": end}
    expected = model.generate(**batch.inputs, **settings, return_dict_in_generate=True, output_logits=True)
    logits = []
    got = model.generate(**batch.inputs, **settings, cache_implementation="static",
                         custom_generate=decoding.make_decode_loop(STATIC, [], keep_logits=True, logits=logits))
    assert got[0, width + 2:].tolist() == [pad] * 4
    assert torch.equal(got, expected.sequences)
    for step_loop, step_hf in zip(logits, expected.logits, strict=True):
        torch.testing.assert_close(step_loop, step_hf, rtol=0, atol=1e-5)


def test_sampled_rows_after_greedy_rows_sample_as_their_own_call(tiny_checkpoint):
    """The warpers run on the sampled rows' span only (``_Loop.sampled_span``): a block that starts after greedy rows
    must read its own rows of that span, and the greedy row before it decodes as a greedy call."""
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    batch, images, boxes = _prompt_batch(adapter)

    def alone(rows):
        return adapter.build_batch([adapter.describer_prompt(b, im) for b, im in zip(boxes[rows], images[rows])],
                                   images[rows])

    together = generate(model, adapter, batch, SAMPLED, True, decoding=STATIC,
                        sampled_rows=[SampledRows(1, 3, torch.Generator().manual_seed(5))])
    sampled = generate(model, adapter, alone(slice(1, 3)), SAMPLED, True, decoding=STATIC,
                       sampled_rows=[SampledRows(0, 2, torch.Generator().manual_seed(5))])
    greedy = generate(model, adapter, alone(slice(0, 1)), GREEDY, True, decoding=STATIC)
    assert together.texts[1:] == sampled.texts and together.texts[:1] == greedy.texts
    # two blocks after the greedy row: each reads its own rows of the span (not only the span's first rows)
    seeds = {1: 6, 2: 7}
    split = generate(model, adapter, batch, SAMPLED, True, decoding=STATIC,
                     sampled_rows=[SampledRows(row, row + 1, torch.Generator().manual_seed(seed))
                                   for row, seed in seeds.items()])
    for row, seed in seeds.items():
        own = generate(model, adapter, alone(slice(row, row + 1)), SAMPLED, True, decoding=STATIC,
                       sampled_rows=[SampledRows(0, 1, torch.Generator().manual_seed(seed))])
        assert split.texts[row] == own.texts[0]
    assert split.texts[:1] == greedy.texts
    # these rows sample something else than their greedy captions, so the equality above is one of samples
    assert sampled.texts != generate(model, adapter, alone(slice(1, 3)), GREEDY, True, decoding=STATIC).texts


def test_a_row_the_host_check_ends_changes_no_other_rows_tokens(tiny_checkpoint, monkeypatch):
    """Rows 0-1 sampled (a block of their own generator), row 2 greedy; the host check (``row_done``, here a stand-in
    for the locator's box: "the row's first two tokens are row 0's") ends row 0 after its second token. The other
    rows' tokens equal those of the same call without the check (a block's noise keeps its shape whatever rows are
    finished), row 0 is cut at its "box" by ``generate``, and its finished flag is written into the tensor the loop's
    steps read from the start (the one a captured graph replays)."""
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    batch, _, _ = _prompt_batch(adapter)

    def call(stop_at_box):
        blocks = [SampledRows(0, 2, torch.Generator().manual_seed(3))]
        return generate(model, adapter, batch, SAMPLED, False, stop_at_box=stop_at_box, decoding=STATIC,
                        sampled_rows=blocks)

    free = call(False)
    prefix = free.ids_BT[0, :2].tolist()
    assert all(free.ids_BT[row, :2].tolist() != prefix for row in (1, 2)), "only row 0 may meet the stand-in"
    assert free.mask_BT.sum(1).tolist() == [6, 6, 6], "every row runs on past the stop, so later tokens are compared"
    monkeypatch.setattr(rollout, "_holds_box", lambda adapter, ids: list(ids[:2]) == prefix)
    flags, run = [], decoding._run

    def keeping_the_flags(step, loop, *args):
        flags.append(loop.unfinished)  # the tensor the steps read (and a graph captured at step 1 would hold)
        return run(step, loop, *args)

    monkeypatch.setattr(decoding, "_run", keeping_the_flags)
    decoding.STATS.pop()
    stopped = call(True)
    stats = decoding.STATS.pop()
    assert stats.rows_stopped_at_box == 1 and stats.decode_steps == 5
    assert flags[0].tolist() == [0, 1, 1]
    assert stopped.ids_BT[0].tolist() == prefix + [adapter.pad_token_id] * 4 and stopped.mask_BT[0].sum() == 2
    assert torch.equal(stopped.ids_BT[1:], free.ids_BT[1:]) and stopped.texts[1:] == free.texts[1:]
    # row 1 samples: its tokens are not its greedy ones, so the equality above is one of samples
    greedy = generate(model, adapter, batch, GREEDY, False, decoding=STATIC)
    assert not torch.equal(free.ids_BT[1], greedy.ids_BT[1]) and torch.equal(free.ids_BT[2], greedy.ids_BT[2])


# Families whose decode step has no host-side state at all (Gemma's window layers, and Idefics2's Mistral layers, each
# a window layer by its sliding_window, keep a host counter that decides a branch no call that fits its window can
# flip; they are checked for exactness above).
# One per kind of language model: native Qwen-VL, M-RoPE (Qwen2.5-VL), hybrid recurrent (Qwen3.5), Llama (SmolVLM),
# cross-attention to the image (Llama 3.2 Vision); and the wrappers whose forward places image features differently
# (MiniCPM-V 4.7: packed views and canvas M-RoPE; Ovis2: visual indicator tokens), which a step must leave alone.
GRAPH_TYPES = ["qwen", "qwen2_5_vl", "qwen3_5", "smolvlm", "mllama", "minicpmv4_7", "ovis2"]


def _traced_as_one_graph(monkeypatch):
    """Run every decode step through dynamo with fullgraph=True and no recompiles: a host read (``.item()``,
    ``.tolist()``, a branch on a tensor) fails the trace, and host state that changes between steps fails a guard.
    That is what capturing the step once as a CUDA graph and replaying it needs (a CPU stand-in for capture)."""
    run = decoding._run
    torch._dynamo.reset()
    # The step registers its attention by name as it enters; a first registration inside the trace grows the
    # registries between the first and second step (a guard on their size), which a captured graph never reads.
    AttentionInterface.register(decoding.DECODE_ATTENTION, decoding._decode_attention)
    AttentionMaskInterface.register(decoding.DECODE_ATTENTION, sdpa_mask)

    def traced(step, loop, graphed, device, logits, row_check=None):
        return run(torch.compile(step.__call__, fullgraph=True, backend="eager", dynamic=False), loop, graphed,
                   device, logits, row_check)

    monkeypatch.setattr(decoding, "_run", traced)
    return torch._dynamo.config.patch(error_on_recompile=True)


@pytest.mark.parametrize("model_type", GRAPH_TYPES)
def test_a_decode_step_is_one_graph_that_does_not_change_between_steps(tiny_checkpoint, monkeypatch, model_type):
    model, adapter = _model(tiny_checkpoint, model_type)
    batch, _, _ = _prompt_batch(adapter)
    torch.manual_seed(1)
    expected = generate(model, adapter, batch, SAMPLED, True)
    torch.manual_seed(1)
    with _traced_as_one_graph(monkeypatch):
        got = generate(model, adapter, batch, SAMPLED, True, decoding=STATIC)
    assert torch.equal(got.ids_BT, expected.ids_BT)


def test_a_fused_lora_step_is_one_graph(tiny_checkpoint, monkeypatch):
    model, adapter = two_adapter_model(tiny_checkpoint, "qwen2_5_vl")
    images, boxes = sample_images(adapter)
    with _traced_as_one_graph(monkeypatch), row_adapters(model, [("default", 0, 3), ("snapshot", 3, 6)]):
        _, sampled, greedy = describe_with_greedy(model, adapter, images, boxes, images, boxes, SAMPLED, GREEDY, STATIC,
                                                  [SampledRows(0, 2), SampledRows(2, 3)])
    assert sampled.ids_BT.shape[0] == greedy.ids_BT.shape[0] == 3


def test_a_compiled_decode_step_decodes_the_same(tiny_checkpoint):
    """``Decoding(compile_backend=...)``: the forward through torch.compile (aot_eager here: dynamo and AOT
    functionalisation without code generation; inductor gives the same tokens, about a minute on 2 cores)."""
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    batch, _, _ = _prompt_batch(adapter)
    torch._dynamo.reset()
    torch.manual_seed(1)
    expected = generate(model, adapter, batch, SAMPLED, True)
    torch.manual_seed(1)
    got = generate(model, adapter, batch, SAMPLED, True, decoding=Decoding(compile_backend="aot_eager"))
    assert torch.equal(got.ids_BT, expected.ids_BT)


def test_a_compiled_decode_step_reads_each_key_value_head_once(tiny_checkpoint, monkeypatch):
    """Under torch.compile transformers' SDPA copies every key/value head once per query head it serves
    (``repeat_kv``) before attending; SC-Tune's decode-step attention does not, compiled or not. The copies are
    counted while dynamo traces the step (once per layer) and in the eager prefill (the same in both calls)."""
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    text = model.config.get_text_config(decoder=True)
    assert text.num_attention_heads > text.num_key_value_heads, "the test needs a grouped-query model"
    batch, _, _ = _prompt_batch(adapter)
    copies = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda states, n: copies.append(n) or real(states, n))
    counts = {}
    for backend in (None, "aot_eager"):
        torch._dynamo.reset()
        copies.clear()
        generate(model, adapter, batch, GREEDY, True, decoding=Decoding(compile_backend=backend))
        counts[backend] = len(copies)
    assert counts[None] == counts["aot_eager"] == 2 * text.num_hidden_layers, counts  # keys and values, prefill
    assert text._attn_implementation == "sdpa"  # given back after every step


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_the_decode_step_attention_equals_transformers_sdpa(mask, monkeypatch):
    """``decoding._decode_attention`` against transformers' SDPA with its key/value copies (the compiled path): one
    query token per row, 3 query heads per key/value head, padded keys hidden, taken packed whatever the mask (no
    call of transformers' SDPA); a longer query goes to transformers'."""
    fallbacks, sdpa = [], decoding.sdpa_attention_forward

    def counted_sdpa(module, query, *args, **kwargs):
        fallbacks.append(query.shape)
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setattr(decoding, "sdpa_attention_forward", counted_sdpa)
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    key_BHLD, value_BHLD = torch.randn(4, 2, 9, 8), torch.randn(4, 2, 9, 8)
    keep_B11L = torch.rand(4, 1, 1, 9) > 0.3
    keep_B11L[..., 0] = True
    masks = {"none": None, "bool": keep_B11L,
             "float": torch.zeros(4, 1, 1, 9).masked_fill(~keep_B11L, torch.finfo(torch.float32).min)}
    query_BHQD = torch.randn(4, 6, 1, 8)
    got, _ = decoding._decode_attention(module, query_BHQD, key_BHLD, value_BHLD, masks[mask], scaling=0.3)
    repeated = [sdpa_attention.repeat_kv(t, 3) for t in (key_BHLD, value_BHLD)]
    expected = torch.nn.functional.scaled_dot_product_attention(query_BHQD, *repeated, attn_mask=masks[mask],
                                                                scale=0.3).transpose(1, 2)
    assert got.shape == (4, 1, 6, 8) and fallbacks == []
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    longer_BHQD = torch.randn(4, 6, 9, 8)
    got, _ = decoding._decode_attention(module, longer_BHQD, key_BHLD, value_BHLD, None, scaling=0.3)
    expected, _ = sdpa_attention.sdpa_attention_forward(module, longer_BHQD, key_BHLD, value_BHLD, None, scaling=0.3)
    assert fallbacks == [longer_BHQD.shape]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_step_hooks_see_every_decode_step_then_the_end_of_the_call(tiny_checkpoint, monkeypatch):
    """``decoding.STEP_HOOKS`` (scripts/gpu_check.py's profiler window): each decode step's index just before it runs,
    then None after the last, so a window opened at step k and closed at None holds exactly the steps k.. ."""
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    batch, _, _ = _prompt_batch(adapter)
    calls = []

    def hook(index):
        # a step's index, written tokens before it: the prefill wrote the first, each earlier step one more
        calls.append((index, None if index is None else int(written[0].written)))

    made, written = decoding._Loop.__init__, []

    def spy(self, *args, **kwargs):
        made(self, *args, **kwargs)
        written[:] = [self]

    monkeypatch.setattr(decoding._Loop, "__init__", spy)
    monkeypatch.setattr(decoding, "STEP_HOOKS", [hook])
    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=5)  # no end token before the budget
    got = generate(model, adapter, batch, settings, skip_special_tokens=True, decoding=STATIC)
    assert got.ids_BT.shape[1] == 5
    assert calls == [(0, 1), (1, 2), (2, 3), (3, 4), (None, None)]


def test_the_step_rules_equal_transformers_processors_at_every_length():
    """The minimum-length rules read the step from a tensor (a captured step cannot read a Python length) and the
    set rules read a fixed-width sequence whose unwritten columns repeat the last prompt token: both equal
    transformers' processors on the real growing sequence."""
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    vocab, prompt, eos = 40, 5, torch.tensor([3, 7])
    processors = [lp.RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=torch.tensor([0, 2])),
                  lp.MinNewTokensLengthLogitsProcessor(prompt, 3, eos), lp.MinLengthLogitsProcessor(prompt + 2, eos)]
    rules, warpers = decoding._rules_and_warpers(processors, prompt, eos, vocab, "cpu")
    assert warpers == [] and len(rules) == 3
    allowed = torch.tensor([t for t in range(1, vocab) if t not in (3, 7)])  # no 0 (a filler of 0 would show), no end
    ids = allowed[torch.randint(0, len(allowed), (2, prompt + 4))]
    loop = decoding._Loop(ids[:, :prompt], 4, rules, [], [], eos, torch.tensor(0), vocab, keep_logits=False)
    for written in range(4):
        scores = torch.randn(2, vocab)
        expected = scores
        for processor in processors:
            expected = processor(ids[:, : prompt + written], expected)
        got = scores
        for rule in rules:
            got = rule(loop.seq, got, loop.written)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        forced = torch.full((2, vocab), -1e4)
        forced[torch.arange(2), ids[:, prompt + written]] = 1e4
        loop.advance(forced)  # writes the next token of ``ids`` into the loop's buffers
    assert torch.equal(loop.out, ids[:, prompt:]) and int(loop.written) == 4


def test_refusals_name_the_family_and_the_reason(tiny_checkpoint, monkeypatch):
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    assert choose_decoding("auto", adapter, model, "cpu") is None  # auto: CUDA only
    assert choose_decoding("true", adapter, model, "cpu") == Decoding(static_cache=True, cuda_graphs=False)
    assert choose_decoding("false", adapter, model, "cuda") is None
    assert choose_decoding("auto", adapter, model, "cuda", sharded=True) == Decoding(cuda_graphs=False)
    monkeypatch.setattr(type(adapter), "static_decoding_verified", False)
    with pytest.raises(ValueError, match="Qwen25VLAdapter: static decoding is not verified"):
        choose_decoding("true", adapter, model, "cuda")
    assert choose_decoding("auto", adapter, model, "cuda") is None  # auto falls back to transformers' generate
    monkeypatch.setattr(type(adapter), "static_decoding_verified", True)
    monkeypatch.setattr(model.config.get_text_config(decoder=True), "_attn_implementation", "eager")
    assert "attention implementation 'eager'" in adapter.static_decoding_problem(model)
    with pytest.raises(ValueError, match="auto, true, false"):
        choose_decoding("yes", adapter, model, "cuda")


def test_a_family_decodes_statically_only_once_the_exactness_test_covers_it():
    # A new family's adapter starts unverified (transformers' generate decodes it); every family that opts in is
    # under test_static_decoding_equals_transformers_generate (FAMILY_TYPES), but Qwen3.8-Flash-Next, whose sparse
    # attention layers are refused by name in the test below.
    from sc_tune.adapters import adapter_class
    from sc_tune.adapters.base import ModelAdapter
    from sc_tune.adapters.registry import supported_model_types

    assert ModelAdapter.static_decoding_verified is False
    tested = {adapter_class(model_type) for model_type in FAMILY_TYPES}
    verified = [t for t in supported_model_types() if adapter_class(t).static_decoding_verified]
    assert [t for t in verified if adapter_class(t) not in tested] == ["qwen4_exp"]


def test_sparse_attention_layers_are_refused_by_name_and_decode_with_transformers(tiny_checkpoint):
    """Qwen4-Exp's ``indexed_attention`` layers (Qwen Sparse Attention: a per-query top-k of key blocks) have no static
    decode step: true is refused naming them, auto on CUDA falls back to transformers' generate, and SC-Tune's own
    loop on a dynamic cache (where the fused describer loop then runs) decodes what transformers' generate decodes."""
    model, adapter = _model(tiny_checkpoint, "qwen4_exp")
    problem = adapter.static_decoding_problem(model)
    assert problem.startswith("Qwen4ExpAdapter: no static decode step for ['indexed_attention'] layers: ")
    assert "torch.nonzero" in problem and "indexer_position_ids" in problem  # what in transformers' code stops it
    with pytest.raises(ValueError, match=r"--static_decoding true: .*\['indexed_attention'\] layers"):
        choose_decoding("true", adapter, model, "cuda")
    assert choose_decoding("auto", adapter, model, "cuda") is None
    batch, _, _ = _prompt_batch(adapter)
    for settings in (GREEDY, SAMPLED):
        torch.manual_seed(1)
        expected = generate(model, adapter, batch, settings, skip_special_tokens=True)
        torch.manual_seed(1)
        got = generate(model, adapter, batch, settings, skip_special_tokens=True, decoding=Decoding(static_cache=False))
        assert torch.equal(got.ids_BT, expected.ids_BT) and got.texts == expected.texts, settings


def test_a_rule_that_reads_the_sequence_is_refused_and_a_short_window_decodes_dynamically(tiny_checkpoint, monkeypatch):
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    batch, _, _ = _prompt_batch(adapter)
    model.generation_config.no_repeat_ngram_size = 2
    with pytest.raises(ValueError, match="NoRepeatNGramLogitsProcessor"):
        generate(model, adapter, batch, GREEDY, True, decoding=STATIC)
    model.generation_config.no_repeat_ngram_size = None
    # A repetition penalty reads the set of tokens only: allowed, and equal to transformers' (checkpoints set it).
    model.generation_config.repetition_penalty = 1.3
    assert torch.equal(generate(model, adapter, batch, GREEDY, True, decoding=STATIC).ids_BT,
                       generate(model, adapter, batch, GREEDY, True).ids_BT)
    model.generation_config.repetition_penalty = None

    # A window shorter than the call (prompt + new tokens): transformers' dynamic cache instead; one that covers it
    # decodes static. Gemma names its window layers; Mistral's text model (Idefics2's) has a sliding_window and no
    # layer_types, which makes every layer a window layer.
    for windowed_type in ("gemma3", "idefics2"):
        windowed, windowed_adapter = _model(tiny_checkpoint, windowed_type)
        windowed_batch, _, _ = _prompt_batch(windowed_adapter)
        call = windowed_batch.input_ids.shape[1] + GREEDY.max_new_tokens
        for window, static in ((16, False), (call - 1, False), (call, True)):  # shorter than the prompt, the call
            windowed.config.get_text_config(decoder=True).sliding_window = window
            spy = _Recorded(monkeypatch, windowed)
            got = generate(windowed, windowed_adapter, windowed_batch, GREEDY, True, decoding=STATIC)
            assert isinstance(spy.caches[0], StaticCache) == static, (windowed_type, window, call)
            assert torch.equal(got.ids_BT, generate(windowed, windowed_adapter, windowed_batch, GREEDY, True).ids_BT)
            monkeypatch.undo()


def _decode_loops_per_step(trainer):
    """Runs ``trainer.train()``; returns (losses per step, decode loops of each optimizer step, logged entries)."""
    loops = []
    step = trainer.training_step

    def counted(*args, **kwargs):
        decoding.STATS.pop()
        out = step(*args, **kwargs)
        loops.append(decoding.STATS.pop().calls)
        return out

    trainer.training_step = counted
    trainer.train()
    return loops, [entry for entry in trainer.state.log_history if "describer/fused_decoding" in entry]


@pytest.mark.parametrize("model_type", ["qwen", "minicpmv4_7"])
def test_the_trainer_decodes_samples_and_snapshot_captions_in_one_loop_with_equal_losses(tiny_checkpoint, tmp_path,
                                                                                       model_type):
    """LoRA: the policy's samples and the snapshot adapter's greedy captions in one loop (2 decode loops per describer
    rollout instead of 3: captions, then locating), with losses equal to the separate loops (whose greedy captions
    resume from the scoring cache where the family can: Qwen-VL; MiniCPM-V 4.7's recurrent state cannot) over four
    steps of both phases."""
    from tests.helpers import two_phase_trainer

    runs = {}
    for fused in ("true", "false"):
        trainer, losses = two_phase_trainer(tiny_checkpoint(model_type), str(tmp_path / fused),
                                            model_transform=small_lora, static_decoding="true", fused_decoding=fused)
        assert trainer.cycle.fused_greedy == ("snapshot" if fused == "true" else None)
        loops, logged = _decode_loops_per_step(trainer)
        runs[fused] = (losses, loops, [entry["describer/fused_decoding"] for entry in logged])
    # steps 0-1: one describer rollout (two PPO epochs), step 2: locator, step 3: a describer rollout
    assert runs["true"][1] == [2, 0, 1, 2] and runs["false"][1] == [3, 0, 1, 3]
    assert runs["true"][2] == [1.0, 1.0] and runs["false"][2] == [0.0, 0.0]
    assert len(runs["true"][0]) == 4 and runs["true"][0] == runs["false"][0]


def test_a_compiled_decode_step_trains_as_the_eager_one(tiny_checkpoint, tmp_path):
    """``--decoding_compile_backend``: the trainer's decode steps through torch.compile (aot_eager on CPU), the fused
    LoRA loop included; the losses of four steps of both phases equal those of eager steps."""
    from torch._dynamo.utils import counters

    from tests.helpers import two_phase_trainer

    torch._dynamo.reset()
    losses, compiled = {}, {}
    for backend in (None, "aot_eager"):
        trainer, losses[backend] = two_phase_trainer(tiny_checkpoint("qwen2_5_vl"), str(tmp_path / str(backend)),
                                                     model_transform=small_lora, static_decoding="true",
                                                     decoding_compile_backend=backend)
        counters.clear()
        trainer.train()
        assert trainer.cycle.decoding.compile_backend == backend
        compiled[backend] = counters["stats"]["unique_graphs"]
    assert compiled == {None: 0, "aot_eager": compiled["aot_eager"]} and compiled["aot_eager"] > 0, compiled
    assert len(losses[None]) == 4 and losses["aot_eager"] == losses[None]


def test_a_compiled_decode_step_is_refused_where_it_cannot_run(tiny_checkpoint, monkeypatch):
    from sc_tune.arguments import ArgumentError, SCTuneConfig

    with pytest.raises(ArgumentError, match="--decoding_compile_backend .* --static_decoding auto or true"):
        SCTuneConfig(output_dir="unused", use_cpu=True, static_decoding="false", decoding_compile_backend="inductor")
    model, adapter = _model(tiny_checkpoint, "qwen2_5_vl")
    with pytest.raises(ValueError, match="does not run here .*--static_decoding auto on cpu"):
        choose_decoding("auto", adapter, model, "cpu", compile_backend="inductor")
    with pytest.raises(ValueError, match="sharded"):
        choose_decoding("true", adapter, model, "cpu", sharded=True, compile_backend="inductor")
    assert choose_decoding("true", adapter, model, "cpu", compile_backend="inductor").compile_backend == "inductor"
    # on CUDA, auto skips a family without static decoding quietly, but not when a compiled step was asked for
    monkeypatch.setattr(type(adapter), "static_decoding_problem", lambda self, model: "no static cache here")
    assert choose_decoding("auto", adapter, model, "cuda") is None
    with pytest.raises(ValueError, match="--decoding_compile_backend: no static cache here"):
        choose_decoding("auto", adapter, model, "cuda", compile_backend="inductor")


# ---------------------------------------------------------------- a failed CUDA graph capture
class _OneRowLoop:
    """What _capture_or_fall_back reads of a loop: its blocks, its device (``out``) and ``advance``."""

    def __init__(self):
        self.blocks, self.out, self.advanced = [], torch.zeros(1), []

    def advance(self, logits):
        self.advanced.append(logits.clone())


class _Step:
    def __init__(self, loop):
        self.loop, self.forwards = loop, 0

    def model_part(self):
        self.forwards += 1
        return torch.full((1, 4), float(self.forwards))

    def __call__(self):
        self.loop.advance(self.model_part())


def test_a_failed_capture_falls_back_to_the_model_part_then_to_eager_steps(monkeypatch):
    loop = _OneRowLoop()
    step = _Step(loop)
    captured = []

    def capture(function, blocks, keep_output=False):  # the whole step refused, as a library sort can be
        captured.append(function)
        if len(captured) == 1:
            raise RuntimeError("operation failed due to a previous error during capture")
        output = torch.zeros(1, 4)
        return (lambda: output.copy_(function())), output

    monkeypatch.setattr(decoding, "_capture", capture)
    decoding.STATS.pop()
    replay = decoding._capture_or_fall_back(step, loop)
    assert captured == [step, step.model_part]  # the whole step first, then the model's part alone
    replay()
    replay()
    # Each replay runs the model's part, then the token choice on its logits (eagerly, outside the graph).
    assert [float(t[0, 0]) for t in loop.advanced] == [1.0, 2.0]
    stats = decoding.STATS.pop()
    assert (stats.graph_failures, stats.graph_model_part_only) == (1, 1) and "step:" in stats.graph_error

    def refuse(function, blocks, keep_output=False):
        raise RuntimeError("refused")

    monkeypatch.setattr(decoding, "_capture", refuse)
    assert decoding._capture_or_fall_back(step, loop) is step  # both refused: the call decodes eagerly
    assert decoding.STATS.pop().graph_failures == 2


def test_with_sctunes_loop_locator_answers_end_at_their_box_as_with_transformers(tmp_path):
    # The warm start's locator writes boxes that parse, in Qwen3-VL's fenced form with the caption as its label
    # after the box: transformers' loop stops there (BoxCompleteStop); SC-Tune's loop checks each row's text one step
    # late (decoding._RowCheck), ends the row a token after its box and cuts it at the box. Both must give the same
    # ids, masks and answers, SC-Tune's loop with one decode step more, not the label's.
    import json

    from PIL import Image

    from sc_tune.synthetic.shapes import write_split
    from tests.conftest import WARM_START

    write_split(tmp_path, "train", 4, seed=5)
    records = json.loads((tmp_path / "train.json").read_text())[:4]
    model, adapter = load_model_and_adapter(WARM_START)
    model.eval()
    images = [adapter.prepare_image(Image.open(tmp_path / r["image"]).convert("RGB")) for r in records]
    batch = adapter.build_batch([adapter.locator_prompt(r["caption"], im) for r, im in zip(records, images)], images)
    settings = GenerationSettings(max_new_tokens=80)  # room for the label after the box
    theirs = generate(model, adapter, batch, settings, False, stop_at_box=True)
    decoding.STATS.pop()
    ours = generate(model, adapter, batch, settings, False, stop_at_box=True, decoding=STATIC)
    stats = decoding.STATS.pop()
    boxes = [adapter.parse_locator_output(text, image) for text, image in zip(theirs.texts, images)]
    assert all(box is not None for box in boxes), theirs.texts  # the test can tell: every answer holds a box
    # each answer ends with the token that completes its box: the label after it is never decoded
    assert all('"label"' not in text for text in theirs.texts), theirs.texts
    assert ours.texts == theirs.texts
    assert torch.equal(ours.ids_BT, theirs.ids_BT) and torch.equal(ours.mask_BT, theirs.mask_BT)
    # transformers' loop wrote the last box's final token with its last forward (prefill + width - 1 decode steps);
    # SC-Tune's found it while the next step ran, then ended: width decode steps, every row stopped by the check.
    assert stats.rows_stopped_at_box == 4 and stats.decode_steps == theirs.ids_BT.shape[1]
