"""The vision cache is exact: same log-probs, greedy text, losses and gradients with and without it."""


import time
from types import SimpleNamespace

import pytest
import torch

from sc_tune.arguments import SCTuneConfig
from sc_tune.cycle import RolloutCycle
from sc_tune.modeling import freeze_vision_tower, load_model_and_adapter
from sc_tune.phases import PhaseSchedule
from sc_tune.rollout import GenerationSettings, describe, locate
from sc_tune.vision_cache import VisionCache
from tests.helpers import FAST, sample_images, small_lora, two_phase_trainer

CACHED_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen", "cohere_compass", "glm4v", "exaone4_5",
                   "hyperclovax_vision_v2", "video_llama_3"]
# Towers of fixed-size tiles stacked along dim 0, cached per tile (sc_tune.adapters.stacked_tiles).
TILE_FAMILIES = ["llava", "llava_next", "granite4_vision", "llava_onevision", "aya_vision", "gemma3", "internvl",
                 "ovis2", "smolvlm", "idefics3"]
# Views (a thumbnail and slices) packed along the pixels' last dimension, cached per view (sc_tune.adapters.minicpmv).
VIEW_FAMILIES = ["minicpmv4_6", "minicpmv4_7"]
# Gemma 4's tower drops padding patches from its output, so only its trunk is replayed (no whole-output memo).
TRUNK_ONLY_FAMILIES = ["gemma4"]
CACHED_FAMILIES += [*TILE_FAMILIES, *VIEW_FAMILIES, *TRUNK_ONLY_FAMILIES]


# A tower that keeps nothing trainable under fix_vit in a family naming no language-model prefix: its projector.
PROJECTOR_AFTER_THE_TOWER = {"video_llama_3": "model.projector"}


def _vision_tail(model, adapter, model_type):
    """The trainable parameters image features pass through under fix_vit: the merger/resampler inside the tower, or
    (chat-template families) the projector beside it: whatever of ``model.`` is neither language model nor tower."""
    language_model = getattr(adapter, "language_model_prefix", None)
    projector = PROJECTOR_AFTER_THE_TOWER.get(model_type)
    return [p for n, p in model.named_parameters() if p.requires_grad and (
        n.startswith(adapter.vision_prefix + ".")
        or (projector and n.startswith(projector + "."))
        or (language_model and n.startswith("model.") and not n.startswith(language_model + ".")))]


def _cache_units(trunk, call):
    """How many units (images; tiles in TILE_FAMILIES) the cache splits the tower's first call within ``call()``
    into."""
    units = []
    hook = trunk.tower.register_forward_pre_hook(
        lambda module, args, kwargs: units.append(len(trunk.image_pixels(args, kwargs))), with_kwargs=True)
    try:
        result = call()
    finally:
        hook.remove()
    return units[0], result


def _trunk_blocks(tower):
    """The tower's attention blocks (Qwen/GLM: ``blocks``; VideoLLaMA3's SigLIP: ``encoder.layers``)."""
    return tower.blocks if hasattr(tower, "blocks") else tower.encoder.layers


def _teacher_forced_logp(model, adapter, images, boxes_norm):
    """log-probs of a fixed continuation after each describer prompt, with gradients into the trainable tail."""
    prompts = [adapter.describer_prompt(b, im) for b, im in zip(boxes_norm, images)]
    batch = adapter.build_batch(prompts, images, ["a red thing" + adapter.end_text] * len(images))
    logits = model(**batch.inputs, use_cache=False).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return (logp * (batch.labels[:, 1:] != -100)).sum(1)


@pytest.mark.parametrize("model_type", CACHED_FAMILIES)
def test_cache_matches_uncached_logprobs_generation_and_tail_gradients(tiny_checkpoint, model_type):
    _check_cache_matches_uncached(tiny_checkpoint, model_type)


@pytest.mark.parametrize("model_type", ["video_llama_3", "minicpmv4_6"])
def test_trunk_replay_of_a_wholly_frozen_tower_matches_uncached(tiny_checkpoint, model_type):
    """A tower that fix_vit freezes whole (its projector/merger lies outside it) has its whole output memoised, so the
    check above never replays its trunk; the trainer does, wherever the memo misses and the trunk cache holds the
    images: a call cut to its new images, the first calls of the snapshot's frozen copy. No tower parameter can train
    (the whole tower is trunk, and a trainable trunk turns the cache off), so the replay is forced instead: the memo
    off and the images encoded before the passes, every pass, the one with gradients first, runs the tower on the
    replayed trunk outputs."""
    replays = _check_cache_matches_uncached(tiny_checkpoint, model_type, replay_only=True)
    assert replays == 3, "the gradient pass, the captions' prefill, the locator rows: each replayed"


def _check_cache_matches_uncached(tiny_checkpoint, model_type, replay_only=False) -> int:
    """Log-probs with gradients, greedy captions and located boxes the same with and without the cache, and the
    trainable tail's gradients equal; ``replay_only``: with the cache's whole-output memo off and the images encoded
    first, so that every pass replays the trunk. Returns how many tower calls replayed the trunk."""
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    freeze_vision_tower(model, adapter)
    cache = VisionCache.for_model(adapter, [model])
    assert cache is not None
    images, boxes = sample_images(adapter)
    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=2)
    tail = _vision_tail(model, adapter, model_type)
    assert tail, "fix_vit keeps the merger/resampler/projector trainable"

    def run(cached: bool):
        model.zero_grad()
        context = cache.active() if cached else torch.enable_grad()
        with context:
            # The pass with gradients comes first, so the cache must not hand it the no-grad encoding's output.
            model.train()
            logp_B = _teacher_forced_logp(model, adapter, images, boxes)
            logp_B.sum().backward()
            model.eval()
            _, captions = describe(model, adapter, images, boxes, settings)
            located, _ = locate(model, adapter, images + images, captions.texts * 2, settings)
        return captions.texts, located, logp_B.detach(), [p.grad.clone() for p in tail]

    units, plain = _cache_units(adapter.vision_trunk(model), lambda: run(cached=False))
    cache.clear()
    replayed = cache.trunks[0].replayed[-1]
    replays = []
    hook = replayed.register_forward_hook(lambda module, *_: replays.append("forward" in vars(module)))
    try:
        if replay_only:
            cache.trunks[0].output_rows_per_image = False
            with cache.active(), torch.no_grad():
                _teacher_forced_logp(model, adapter, images, boxes)
            replays[:] = []
        cached = run(cached=True)
    finally:
        hook.remove()
    assert cache.encoded_images == units, "each image's (tile's) trunk ran exactly once across all passes"
    if replay_only:
        assert all(replays) and cache.reused_tower_calls == 0, "every tower call replayed the trunk"
    assert cached[0] == plain[0] and cached[1] == plain[1]
    torch.testing.assert_close(cached[2], plain[2], atol=1e-5, rtol=0)
    for g_cached, g_plain in zip(cached[3], plain[3]):
        assert g_plain.abs().sum() > 0
        torch.testing.assert_close(g_cached, g_plain, atol=1e-5, rtol=1e-4)
    return sum(replays)


MEMOISED_FAMILIES = [f for f in CACHED_FAMILIES if f not in TRUNK_ONLY_FAMILIES]


@pytest.mark.parametrize("model_type", [*MEMOISED_FAMILIES, "qwen3_5", "qwen4_exp", "glm4v_moe", "glm46v"])
def test_frozen_tower_runs_its_tail_once_per_image(tiny_checkpoint, model_type):
    # The snapshot's tower has no trainable parameter, so its whole output (merger/resampler included) is
    # memoised per image: greedy captions, then the locator rows in another order and twice over, then scoring.
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    model.requires_grad_(False)
    model.eval()
    cache = VisionCache.for_model(adapter, [model])
    # One image of another size: the memo cuts a call's output per image in proportion to its pixel rows.
    images, boxes = sample_images(adapter, widened=1)
    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=2)
    trunk = adapter.vision_trunk(model)
    tail_calls = []
    # The tail inside the tower; where the projector is outside it (TILE_FAMILIES), the tower's last recorded layer.
    tail = ([m for n, m in model.named_modules() if n.startswith(adapter.vision_trainable_prefixes[0])][0]
            if adapter.vision_trainable_prefixes else trunk.replayed[-1])
    hook = tail.register_forward_hook(lambda *a: tail_calls.append(1))
    first_pass_calls = []  # the tail's calls by the end of the describer pass: plain, then cached

    def run():
        _, captions = describe(model, adapter, images, boxes, settings)
        first_pass_calls.append(len(tail_calls))
        order = [2, 0, 1, 0, 1, 2]  # another order than the describer's, each image twice
        located, _ = locate(model, adapter, [images[i] for i in order], [captions.texts[i] for i in order], settings)
        # Log-probs see every feature value: a memo that hands an image another image's rows changes them.
        return captions.texts, located, _teacher_forced_logp(model, adapter, [images[i] for i in order], boxes * 2)

    try:
        plain = run()
        plain_calls, tail_calls[:] = len(tail_calls), []
        with cache.active():
            cached = run()
    finally:
        hook.remove()
    assert trunk.output_rows_per_image
    # The tail runs in the first call only: once, or twice where the call's views repeat (MiniCPM-V's slices of these
    # images include equal ones): over the new ones, then replayed whole. Every later call is answered from the memo.
    assert plain_calls >= 3 and first_pass_calls[1] == (2 if model_type in VIEW_FAMILIES else 1)
    assert len(tail_calls) == first_pass_calls[1], "the tail ran again after the first call"
    assert cache.reused_tower_calls >= 2
    assert cached[0] == plain[0] and cached[1] == plain[1]
    torch.testing.assert_close(cached[2], plain[2], atol=1e-5, rtol=0)


def test_the_counters_start_at_zero_count_what_ran_and_start_again_at_each_clear(tiny_checkpoint):
    # ``timing/vision_encoding`` is what ``pop_encode_seconds`` hands the stage clock: the trunk's seconds since the
    # last pop, within the calls' own time, and nothing before the first call or after a clear.
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_5_vl"))
    model.requires_grad_(False)
    model.eval()
    cache = VisionCache.for_model(adapter, [model])
    images, boxes = sample_images(adapter)
    settings = GenerationSettings(max_new_tokens=2)
    for _ in range(2):  # a new cache, then the same cache cleared
        assert (cache.encoded_images, cache.reused_tower_calls, cache.pop_encode_seconds()) == (0, 0, 0.0)
        start = time.perf_counter()
        with cache.active():
            describe(model, adapter, images, boxes, settings)
        wall = time.perf_counter() - start
        assert 0 < cache.pop_encode_seconds() <= wall and cache.pop_encode_seconds() == 0.0
        with cache.active():
            describe(model, adapter, images, boxes, settings)  # the frozen tower's whole output, memoised
        assert (cache.encoded_images, cache.reused_tower_calls, cache.pop_encode_seconds()) == (3, 1, 0.0)
        cache.clear()


@pytest.mark.parametrize("model_type", CACHED_FAMILIES)
def test_a_call_whose_images_repeat_or_are_cached_runs_the_trunk_on_the_new_ones_once(tiny_checkpoint, model_type):
    """The fused describer loop's first call holds each image twice (sampled and greedy rows), ``--num_generations``
    K times: the trunk runs once per image, over only the new images, and every row still gets its own image's
    features (the log-probs of rows in another order equal the uncached tower's)."""
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    freeze_vision_tower(model, adapter)
    model.eval()
    cache = VisionCache.for_model(adapter, [model])
    images, boxes = sample_images(adapter)
    trunk = adapter.vision_trunk(model)
    assert trunk.images_call is not None
    first_block = trunk.replayed[0]  # any block the trunk computes when encoding
    rows = []

    def count(module, args, output):
        if "forward" not in vars(module):  # the block computed (a replay answers through an instance forward)
            rows.append(output.shape[trunk.rows_dim])

    hook = first_block.register_forward_hook(count)
    twice, order = [0, 1, 0, 1], [2, 0, 1, 2]
    try:
        with torch.no_grad():
            units, plain = _cache_units(trunk, lambda: [
                _teacher_forced_logp(model, adapter, [images[i] for i in o], [boxes[i] for i in o])
                for o in (twice, order)])
            units_per_image = units // len(twice)
            plain_rows, rows[:] = list(rows), []
            with cache.active():
                cached = [_teacher_forced_logp(model, adapter, [images[i] for i in o], [boxes[i] for i in o])
                          for o in (twice, order)]
    finally:
        hook.remove()
    one_image = plain_rows[0] // 4  # the trunk's rows of one image (all sample images have one size)
    assert plain_rows == [4 * one_image, 4 * one_image]
    assert rows == [2 * one_image, one_image], "images 0 and 1 once, then only image 2"
    assert cache.encoded_images == 3 * units_per_image
    for got, expected in zip(cached, plain):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# (vision_feature_layer, the encoder layers of a six-layer tower a replay must answer from the cache). hidden_states has
# seven entries: 0 the embeddings (recomputed in every replay, so no layer), i the output of layer i - 1, negative
# from the end; layer 5 (last_hidden_state) is always read.
DEEP_TOWER_READS = [([-3], [3, 5]), ([2], [1, 5]), ([0, -7], [5]), ([1, -2, 4], [0, 3, 4, 5]), ([6], [5])]


@pytest.mark.parametrize(("feature_layers", "read_layers"), DEEP_TOWER_READS)
def test_a_deep_towers_replay_answers_the_hidden_states_its_projector_reads(feature_layers, read_layers):
    """The tiny checkpoints' towers have two layers, so their replays run every layer and the choice of which layers
    to record cannot go wrong there. A six-layer tower reading layers between skipped ones, from the front and from
    the end: the replayed hidden states the projector reads, and the last one, equal the tower's own, while a skipped
    layer's (passed through) does not, so a wrong choice of recorded layers would show."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from sc_tune.adapters.stacked_tiles import stacked_tiles_trunk

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                             num_attention_heads=2, image_size=8, patch_size=4)).eval()
    tower.requires_grad_(False)
    trunk = stacked_tiles_trunk(tower, feature_layers)
    layers = list(tower.get_submodule("encoder.layers"))
    assert [layers.index(layer) for layer in trunk.replayed] == read_layers
    assert len(trunk.skipped) == len(layers) - len(read_layers)

    trunk.output_rows_per_image = False  # no whole-output memo: the second call replays the trunk
    cache = VisionCache([trunk])
    pixels_TCHW = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        plain = tower(pixels_TCHW, output_hidden_states=True)
        with cache.active():
            tower(pixels_TCHW, output_hidden_states=True)
            replayed = tower(pixels_TCHW, output_hidden_states=True)
    assert cache.encoded_images == 3, "the second call replayed: no tile was encoded again"
    for index in feature_layers:
        torch.testing.assert_close(replayed.hidden_states[index], plain.hidden_states[index], atol=1e-6, rtol=0)
    torch.testing.assert_close(replayed.last_hidden_state, plain.last_hidden_state, atol=1e-6, rtol=0)
    skipped = [i + 1 for i in range(len(layers)) if i not in read_layers]
    assert all(not torch.allclose(replayed.hidden_states[i], plain.hidden_states[i]) for i in skipped), \
        "a skipped layer passes its input through in a replay"


@pytest.mark.parametrize("model_type", ["llava_next", "aya_vision", "internvl", "smolvlm", "gemma4", "minicpmv4_6"])
def test_images_of_different_tile_counts_share_a_call_and_each_tile_is_encoded_once(tiny_checkpoint, model_type):
    """A widened image has another tile count (LLaVA-NeXT: 3 anyres tiles against 5, padded across the batch and
    dropped by the model; Aya Vision, InternVL: more crops; Gemma 4: one row, with more valid patches; MiniCPM-V: a
    wider thumbnail and 8 slices against 4). The cache's unit is the tile (Gemma 4: the image; MiniCPM-V: the view),
    so calls that mix the images in any order, repeat them, or hold cached ones give every row its own image's
    features."""
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    freeze_vision_tower(model, adapter)
    model.eval()
    cache = VisionCache.for_model(adapter, [model])
    images, boxes = sample_images(adapter, widened=1)
    if model_type == "gemma4":
        assert len({image.num_tokens for image in images}) > 1
        tiles = [[image] for image in images]
    elif model_type == "minicpmv4_6":
        tiles = [_views(image.tensors) for image in images]
        assert len({len(t) for t in tiles}) > 1 and min(map(len, tiles)) >= 3, "a thumbnail and slices"
        assert len({t[0][0] for t in tiles}) > 1, "thumbnails of different grids"
        # Slices of one flat colour repeat within an image: the same view, encoded once.
        tiles = [list(dict.fromkeys(sum(tiles, [])))]
    else:
        tiles = [_unpadded_tiles(image.tensors["pixel_values"]) for image in images]
        assert len({len(t) for t in tiles}) > 1

    def logp(order):
        return _teacher_forced_logp(model, adapter, [images[i] for i in order], [boxes[i] for i in order])

    orders = ([1, 0, 1], [2, 1, 0, 2], [1])
    with torch.no_grad():
        plain = [logp(order) for order in orders]
        with cache.active():
            cached = [logp(order) for order in orders]
    assert cache.encoded_images == sum(map(len, tiles))
    for got, expected in zip(cached, plain):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _views(tensors):
    """MiniCPM-V's views of one image as (grid, pixel bytes): ``target_sizes`` (h, w) rows, each view ``h * w``
    patches of ``patch``-wide columns of ``pixel_values`` (1, 3, patch, columns)."""
    pixels, patch = tensors["pixel_values"], tensors["pixel_values"].shape[-2]
    grids = [tuple(grid) for grid in tensors["target_sizes"].tolist()]
    columns = torch.split(pixels[0], [h * w * patch for h, w in grids], dim=-1)
    return [(grid, view.numpy().tobytes()) for grid, view in zip(grids, columns)]


def _unpadded_tiles(pixel_values):
    """An image's tiles, without the all-zero ones padded in (LLaVA-NeXT's (1, tiles, C, H, W))."""
    tiles = pixel_values.flatten(0, -4)
    return [t for t in tiles if t.any()]


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "cohere_compass", "glm4v", "exaone4_5",
                                        "hyperclovax_vision_v2", "video_llama_3"])
def test_the_trunk_encodes_with_one_attention_call_per_window_length(tiny_checkpoint, monkeypatch, model_type):
    """Without flash-attn, transformers' vision attention makes one call per window (per image); while the cache
    encodes, the packed-window implementation makes one per window length and layer, with the same features (the
    whole-pipeline equality is test_cache_matches_uncached_logprobs_generation_and_tail_gradients)."""
    from sc_tune.vision_cache import _packed_windows_attention

    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    freeze_vision_tower(model, adapter)
    model.eval()
    trunk = adapter.vision_trunk(model)
    images, _ = sample_images(adapter)
    batch = adapter.build_batch([adapter.describer_prompt([0.1, 0.1, 0.5, 0.5], im) for im in images], images)
    pixels, grid = batch.inputs["pixel_values"], batch.inputs["image_grid_thw"]
    per_image = {"merge_sizes": batch.inputs["image_merge_sizes"]} if "image_merge_sizes" in batch.inputs else {}
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape[0]) or sdpa(*a, **k))
    with torch.no_grad():
        plain = trunk.tower(pixels, grid_thw=grid, **per_image).last_hidden_state
        plain_calls, calls[:] = len(calls), []
        cache = VisionCache.for_model(adapter, [model])
        with cache.active():
            cached = trunk.tower(pixels, grid_thw=grid, **per_image).last_hidden_state
    layers = len(_trunk_blocks(trunk.tower))
    assert cache.encoded_images == len(images) and plain_calls >= len(images) * layers
    assert len(calls) == layers and all(n == len(images) for n in calls), "one call per layer, a window per image"
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    # windows of two lengths in one layer: each window attends to itself only, as in the per-window loop
    q, k, v = (torch.randn(1, 2, 7, 4) for _ in range(3))
    cu = torch.tensor([0, 3, 5, 8 - 1])
    got, _ = _packed_windows_attention(None, q, k, v, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=0.5).transpose(1, 2)
        torch.testing.assert_close(got[:, a:b], expected, atol=1e-6, rtol=1e-6)


def test_the_packed_window_attention_refuses_what_it_would_compute_wrongly():
    # It attends within each window, unmasked and both ways: a mask, causal attention, or keys cut into other windows
    # than the queries, each alone, would be dropped without a word.
    from sc_tune.vision_cache import _packed_windows_attention

    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    cu = torch.tensor([0, 3, 6])
    _packed_windows_attention(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    for wrong in ({"attention_mask": torch.ones(1, 1, 6, 6, dtype=torch.bool)}, {"is_causal": True},
                  {"cu_seq_lens_k": torch.tensor([0, 2, 6])}):
        with pytest.raises(ValueError, match="only unmasked, non-causal self-attention within each window"):
            _packed_windows_attention(None, q, k, v, **{"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, **wrong})


def test_the_packed_window_attention_serves_each_query_head_its_groups_key_head():
    # Grouped-query attention (EXAONE 4.5's tower): 4 query heads over 2 key/value heads, as many tokens as query
    # heads (the tokens' dimension must not be taken for the heads'); windows of lengths 1 and 3.
    from sc_tune.vision_cache import _packed_windows_attention

    q = torch.randn(1, 4, 4, 8)
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    cu = torch.tensor([0, 1, 4])
    got, _ = _packed_windows_attention(None, q, k, v, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    k_full, v_full = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # transformers' repeat_kv layout
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k_full[:, :, a:b], v_full[:, :, a:b], scale=0.25).transpose(1, 2)
        torch.testing.assert_close(got[:, a:b], expected, atol=1e-6, rtol=1e-6)


def test_images_whose_keys_collide_are_told_apart_by_their_pixels(tiny_checkpoint, monkeypatch):
    """The lookup key (sums) only proposes a cached image; the pixels decide. With every key made equal, each image
    still gets its own encoding: alone, two new ones in one call (one of them twice), then the three cached ones (each
    found past the first image of its key, the second and the third)."""
    import sc_tune.vision_cache as vision_cache

    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_5_vl"))
    freeze_vision_tower(model, adapter)
    model.eval()
    tower = adapter.vision_trunk(model).tower
    images, _ = sample_images(adapter)
    batch = adapter.build_batch([adapter.describer_prompt([0.1, 0.1, 0.5, 0.5], im) for im in images], images)
    pixels, grid = batch.inputs["pixel_values"], batch.inputs["image_grid_thw"]
    rows = grid.prod(-1).tolist()
    per_image = list(torch.split(pixels, rows))

    def call(order):
        return tower(torch.cat([per_image[i] for i in order]), grid_thw=grid[order]).pooler_output

    monkeypatch.setattr(vision_cache, "_keys", lambda images: [("one key",)] * len(images))
    cache = VisionCache.for_model(adapter, [model])
    with torch.no_grad():
        plain = [call(order) for order in ([0], [2, 1, 2], [2, 1, 0])]
        with cache.active():
            cached = [call(order) for order in ([0], [2, 1, 2], [2, 1, 0])]
    assert cache.encoded_images == len(images)
    for got, expected in zip(cached, plain):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cache_is_off_without_fix_vit(tiny_checkpoint):
    # The families without a trunk (vision_trunk None) get no cache either: test_template_families.py's
    # test_mllama_prompt_and_vision_caches_are_refused_by_name and its Idefics2 twin.
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_vl"))
    assert VisionCache.for_model(adapter, [model]) is None, "a trainable trunk must never be cached"
    freeze_vision_tower(model, adapter)
    assert VisionCache.for_model(adapter, [model]) is not None


def test_the_cache_is_cleared_at_each_new_rollout_and_phase_but_kept_over_a_rollouts_ppo_epochs(tiny_checkpoint,
                                                                                                   tmp_path):
    # Lookups compare pixels, so a stale image is never a wrong hit within a phase: what a missed clear costs there is
    # memory, every earlier rollout's encodings held to the end of the phase. At a phase switch the snapshot's frozen
    # tower takes new weights, so its memo must go.
    _, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_5_vl"))
    cycle = RolloutCycle(adapter, SCTuneConfig(output_dir=str(tmp_path), **FAST))
    clears = []
    cycle.vision_cache = SimpleNamespace(clear=lambda: clears.append(step))
    # Two describer rollouts of two PPO epochs each (steps 0-3), then two locator steps (4, 5), twice.
    schedule = PhaseSchedule(describer_rollouts=2, locator_steps=2, ppo_epochs=2, describer_lr=1e-3, locator_lr=1e-3)
    for step in range(12):
        cycle.begin_step(schedule.at(step))
    assert clears == [0, 2, 4, 5, 6, 8, 10, 11]


def _run_steps(checkpoint, tmp_path, vision_cache: bool, **overrides):
    trainer, losses = two_phase_trainer(checkpoint, str(tmp_path / str(vision_cache)), vision_cache=vision_cache,
                                        **overrides)
    assert (trainer.cycle.vision_cache is not None) == vision_cache
    trainer.train()
    return losses, trainer


# MiniCPM-V: the memoised whole output of a tower called with every image's views packed into one row; the tiny
# checkpoint cuts each sample image into a thumbnail and 4 slices, the cache's units.
@pytest.mark.parametrize("model_type, lora, units_per_image",
                         [("qwen2_5_vl", False, 1), ("qwen2_5_vl", True, 1), ("minicpmv4_6", False, 5)])
def test_training_losses_identical_with_and_without_cache(tiny_checkpoint, tmp_path, model_type, lora,
                                                          units_per_image):
    transform = small_lora if lora else None
    checkpoint = tiny_checkpoint(model_type)
    plain, _ = _run_steps(checkpoint, tmp_path, False, model_transform=transform)
    cached, trainer = _run_steps(checkpoint, tmp_path, True, model_transform=transform)
    encoded = trainer.cycle.vision_cache.encoded_images
    assert len(plain) == 4 and 0 < encoded <= trainer.args.per_device_train_batch_size * units_per_image
    assert all(loss != 0 for loss in plain)
    logged = {k for entry in trainer.state.log_history for k, v in entry.items() if k.startswith("timing/") and v > 0}
    stages = ["policy_sampling", "snapshot_generation", "locating", "snapshot_scoring", "forward", "backward"]
    assert logged == {f"timing/{s}" for s in [*stages, "vision_encoding"]}
    assert cached == pytest.approx(plain, abs=1e-5)


def test_gemma4_patches_at_other_positions_are_another_image(tiny_checkpoint):
    """Gemma 4's tower reads each patch's (x, y) position beside its pixels: the same patches laid out otherwise (a
    plain image at another aspect ratio) encode otherwise, so the cache must not take them for a cached image."""
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint("gemma4"))
    freeze_vision_tower(model, adapter)
    model.eval()
    images, _ = sample_images(adapter)
    pixels, positions = images[0].tensors["pixel_values"], images[0].tensors["image_position_ids"]
    transposed = positions.flip(-1)  # (x, y) -> (y, x); padding stays (-1, -1)
    tower = adapter.vision_trunk(model).tower

    def encode():
        return tower(pixel_values=torch.cat([pixels, pixels]),
                     pixel_position_ids=torch.cat([positions, transposed])).last_hidden_state

    cache = VisionCache.for_model(adapter, [model])
    computed = []  # the encoder layers that computed

    def record(module, args, output):
        if "forward" not in vars(module):  # a replay or a pass-through answers through an instance forward
            computed.append(module)

    hooks = [layer.register_forward_hook(record) for layer in tower.encoder.layers]
    try:
        with torch.no_grad():
            plain = encode()
            with cache.active():
                cached = encode()
                computed[:] = []
                again = encode()  # both images cached: the pooler runs, no encoder layer does
    finally:
        for hook in hooks:
            hook.remove()
    half = plain.shape[0] // 2
    assert not torch.allclose(plain[:half], plain[half:], atol=1e-3), "the positions change the features"
    assert cache.encoded_images == 2
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    assert computed == [] and len(tower.encoder.layers) >= 2
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=1e-5)


def test_smolvlm_the_same_crop_under_another_patch_mask_is_another_tile(tiny_checkpoint):
    """SmolVLM's tower reads each crop's patch_attention_mask beside its pixels (padding patches masked out): the same
    pixels under another mask encode otherwise, so the mask is part of a tile's key, and a cut call cuts it too."""
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint("smolvlm"))
    freeze_vision_tower(model, adapter)
    model.eval()
    images, _ = sample_images(adapter)
    crop = images[0].tensors["pixel_values"][0, :1]  # (1, C, H, W)
    patches = model.config.vision_config.image_size // model.config.vision_config.patch_size
    whole = torch.ones(1, patches, patches, dtype=torch.bool)
    masked = whole.clone()
    masked[:, -1] = False  # the last row of patches taken for padding
    tower = adapter.vision_trunk(model).tower

    def encode(order):
        masks = torch.cat([whole, masked])[order]
        pixels = crop.expand(len(order), -1, -1, -1)
        return tower(pixel_values=pixels, patch_attention_mask=masks).last_hidden_state

    cache = VisionCache.for_model(adapter, [model])
    orders = ([0, 1, 0], [1])
    with torch.no_grad():
        plain = [encode(order) for order in orders]
        with cache.active():
            cached = [encode(order) for order in orders]
    assert not torch.allclose(plain[0][0], plain[0][1], atol=1e-3), "the mask changes the features"
    assert cache.encoded_images == 2
    for got, expected in zip(cached, plain):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_minicpmv_the_same_patches_on_another_grid_or_unmerged_are_another_view(tiny_checkpoint, monkeypatch):
    """MiniCPM-V's tower reads each view's patch grid (target_sizes: positions, attention and merge windows) and the
    window-merger switch beside its pixels: the same patches as 4 x 8 and as 8 x 4, or without the window merger
    ("4x"), encode otherwise, so the cache must not take one for the other. While the cache encodes, each layer's
    attention, the window merger's 2 x 2 windows included, is one call per window length."""
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint("minicpmv4_6"))
    freeze_vision_tower(model, adapter)
    model.eval()
    images, _ = sample_images(adapter, widened=1)
    tensors = images[1].tensors
    assert _views(tensors)[0][0] == (4, 8), "the widened image's thumbnail: the first view"
    thumbnail = tensors["pixel_values"][..., :4 * 8 * tensors["pixel_values"].shape[-2]]
    tower = adapter.vision_trunk(model).tower

    def encode():
        twice = tower(torch.cat([thumbnail, thumbnail], -1), target_sizes=torch.tensor([[4, 8], [8, 4]]))
        unmerged = tower(thumbnail, target_sizes=torch.tensor([[4, 8]]), use_vit_merger=False)
        return twice.last_hidden_state, unmerged.last_hidden_state

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape[0]) or sdpa(*a, **k))
    cache = VisionCache.for_model(adapter, [model])
    with torch.no_grad():
        plain = encode()
        plain_calls, calls[:] = len(calls), []
        with cache.active():
            cached = encode()
    half = plain[0].shape[1] // 2
    assert not torch.allclose(plain[0][:, :half], plain[0][:, half:], atol=1e-3), "the grid changes the features"
    assert plain[1].shape[1] == 4 * half, "unmerged: a row per patch"
    assert cache.encoded_images == 3
    # 2 views: a call per view in each layer and per window (8 a view) in the merger; unmerged, a call per layer
    assert plain_calls == 2 + 16 + 2 + 2 and calls == [2, 16, 2, 1, 1], "one call per layer and window length"
    for got, expected in zip(cached, plain):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_minicpmv_view_keys_keep_every_grid_side_exact_in_bfloat16_pixels():
    """A view's key (``image_pixels``) holds its patch grid beside its pixels, in the pixels' dtype where that holds
    the view's sides exactly: bfloat16 up to 256, which it keeps; above, float32, else a side of 257 would read 256. The
    views 257 x 256 and 256 x 257 of the same flat pixels (the same patches on another grid, which the tower encodes
    otherwise) would then have equal bfloat16 keys, and the cache would take one for the other."""
    from sc_tune.adapters.minicpmv import _views as view_keys

    patch = 1  # one pixel a patch: the keys' layout columns are what is checked, not the pixels

    def keys(*grids):
        pixels = torch.full((1, 3, patch, sum(h * w for h, w in grids) * patch), 0.5, dtype=torch.bfloat16)
        return view_keys((pixels,), {"target_sizes": torch.tensor(grids)})

    def layout(view):  # each row's h, w and window-merger switch: one row for the whole view
        rows = view[:, -3:].unique(dim=0)
        assert len(rows) == 1
        return rows[0].tolist()

    (widest_exact,) = keys((256, 1))
    assert widest_exact.dtype == torch.bfloat16 and layout(widest_exact) == [256, 1, 1]
    (one_more,) = keys((1, 257))
    assert one_more.dtype == torch.float32 and layout(one_more) == [1, 257, 1]
    tall, wide = keys((257, 256), (256, 257))
    assert (tall.dtype, wide.dtype) == (torch.float32, torch.float32)
    assert (layout(tall), layout(wide)) == ([257, 256, 1], [256, 257, 1])
    assert torch.equal(tall.to(torch.bfloat16), wide.to(torch.bfloat16)), "in bfloat16 both grids read 256 x 256"
    assert not torch.equal(tall, wide)
    # Chosen per view: a small view's key is the same beside a view that needs float32 as alone (else a call that
    # also holds a large view would miss the small view's cached features).
    small_beside_large, _ = keys((2, 3), (1, 257))
    (small_alone,) = keys((2, 3))
    assert small_beside_large.dtype == small_alone.dtype == torch.bfloat16 and torch.equal(small_beside_large,
                                                                                            small_alone)


def test_a_patch_grid_tower_call_is_cut_to_some_images_only_where_it_holds_nothing_else():
    # A call is cut to the images not cached yet only where every argument is the pixel rows, a per-image argument or
    # a flag that says nothing about the images. Anything else (a third positional argument, a keyword such as a
    # precomputed cu_seqlens of the whole call) would be wrong for the cut call, so the call is left whole (None).
    from sc_tune.adapters.patch_grid_chat import PatchGridTowerCall

    grid_thw = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 4, 2]])  # 4, 8 and 8 patch rows
    pixels = torch.arange(20 * 3, dtype=torch.float).reshape(20, 3)
    image_rows = [pixels[:4], pixels[4:12], pixels[12:]]
    call = PatchGridTowerCall()
    for args, kwargs in (((pixels, grid_thw), {"return_dict": True}), ((pixels,), {"grid_thw": grid_thw}),
                         ((), {"hidden_states": pixels, "grid_thw": grid_thw})):
        cut_args, cut_kwargs = call.with_images(args, kwargs, [2, 0])
        torch.testing.assert_close(cut_args[0], torch.cat([image_rows[2], image_rows[0]]), rtol=0, atol=0)
        assert set(cut_kwargs) == {"grid_thw"} | set(kwargs) - {"hidden_states"}
        assert cut_kwargs["grid_thw"].tolist() == [[1, 4, 2], [1, 2, 2]]
        assert cut_kwargs.get("return_dict", True) is True
    assert call.with_images((pixels, grid_thw, torch.tensor([0, 4, 12, 20])), {}, [0]) is None
    assert call.with_images((pixels, grid_thw), {"cu_seqlens": torch.tensor([0, 4, 12, 20])}, [0]) is None
    assert call.with_images((pixels,), {"grid_thw": grid_thw, "position_ids": torch.arange(20)}, [0]) is None

    # VideoLLaMA3's tower names a third per-image argument: by position it is cut with the others, a fourth is not.
    merge_sizes = torch.tensor([1, 2, 2])
    call = PatchGridTowerCall(("pixel_values", "grid_thw", "merge_sizes"))
    cut_args, cut_kwargs = call.with_images((pixels, grid_thw, merge_sizes), {}, [1])
    torch.testing.assert_close(cut_args[0], image_rows[1], rtol=0, atol=0)
    assert (cut_kwargs["grid_thw"].tolist(), cut_kwargs["merge_sizes"].tolist()) == ([[1, 2, 4]], [2])
    assert call.with_images((pixels, grid_thw, merge_sizes, merge_sizes), {}, [1]) is None
