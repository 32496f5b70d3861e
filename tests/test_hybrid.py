"""The hybrid Qwen3.5 text model (Gated DeltaNet + full attention) as the benchmark trains it from scratch.

docs/notes/hybrid-qwen3_5.md has the measurements; ``scripts/diagnose_hybrid.py`` reproduces them.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from PIL import Image

from sc_tune.synthetic.shapes import render, scene_stream
from sc_tune.synthetic.warm_start import WarmStartConfig, initial_model, scene_samples
from tests.conftest import script_module

RELEASED_PATTERN = "linear_attention,linear_attention,linear_attention,full_attention"
# Each hybrid's released pattern: three Gated DeltaNet layers, then attention (Qwen4-Exp's with Qwen Sparse Attention;
# its n-gram embedding sits before the first layer, its layers between gated residual streams).
RELEASED_PATTERNS = {"qwen3_5": RELEASED_PATTERN,
                     "qwen4_exp": RELEASED_PATTERN.replace("full_attention", "indexed_attention")}
# Tokens from a describer prompt's first box coordinate to its answer, for coordinates of three digits: what
# scripts/diagnose_hybrid.py decay measures (test_decay_command checks that it still does).
BOX_TO_ANSWER = 34


def _gated_deltanet_layers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]


def _per_token_decay(layer) -> torch.Tensor:
    """exp(g) per head for a neutral input (a_t = 0): how much of its state a head keeps from one token to the next."""
    return torch.exp(-layer.A_log.exp() * torch.nn.functional.softplus(layer.dt_bias)).detach()


def test_tiny_hybrid_starts_with_gated_deltanet_memory():
    """Regression: transformers' init (dt_bias = 1) left every head of a from-scratch hybrid keeping less than 1e-15
    of its state over a describer prompt's box-to-answer distance, so no linear-attention layer could carry the box
    to the answer. The reference init (dt in [1e-3, 1e-1]) gives heads that do."""
    cfg = WarmStartConfig(model_type="qwen3_5", hidden=64, vision_width=32, layers=8)  # 4 Gated DeltaNet layers
    layers = _gated_deltanet_layers(initial_model(cfg)[0])
    assert len(layers) == 4
    steps = torch.cat([torch.nn.functional.softplus(layer.dt_bias.detach()) for layer in layers])
    assert steps.min() >= 1e-4 and steps.max() <= 0.1 + 1e-6  # the reference's dt range (floor 1e-4)
    kept = torch.cat([_per_token_decay(layer) ** BOX_TO_ANSWER for layer in layers])
    assert (kept > 0.01).sum() >= 2, kept  # heads that still hold the box at the answer
    # The option that reproduces the earlier builds keeps transformers' init: nothing survives the distance.
    old = _gated_deltanet_layers(initial_model(WarmStartConfig(**{**cfg.__dict__, "linear_attention_init":
                                                                  "transformers"}))[0])
    assert all(torch.equal(layer.dt_bias.detach(), torch.ones_like(layer.dt_bias)) for layer in old)
    assert max((_per_token_decay(layer) ** BOX_TO_ANSWER).max().item() for layer in old) < 1e-6
    with pytest.raises(ValueError, match="linear_attention_init 'fla'"):
        initial_model(WarmStartConfig(model_type="qwen3_5", linear_attention_init="fla"))


@pytest.mark.parametrize("model_type", RELEASED_PATTERNS)
def test_reference_init_touches_only_the_decay_steps(model_type):
    """The re-draw has its own generator: every other weight is what transformers drew (earlier builds reproduce)."""
    common = dict(model_type=model_type, hidden=64, vision_width=32, text_layer_types=RELEASED_PATTERNS[model_type],
                  layers=4)
    new = dict(initial_model(WarmStartConfig(**common))[0].named_parameters())
    old = dict(initial_model(WarmStartConfig(**common, linear_attention_init="transformers"))[0].named_parameters())
    differ = sorted(name for name, p in new.items() if not torch.equal(p, old[name]))
    assert differ == [f"model.language_model.layers.{i}.linear_attn.dt_bias" for i in range(3)]


def _rows(adapter, cfg, count):
    rng = random.Random(0)
    scenes = scene_stream(5, cfg.spec)
    samples = []
    while len(samples) < count:
        scene = next(scenes)
        samples += scene_samples(scene, adapter.prepare_image(render(scene, cfg.spec)), adapter, rng, cfg)
    return samples[:count]


@pytest.mark.parametrize("model_type", RELEASED_PATTERNS)
def test_a_left_padded_row_equals_the_row_alone_through_the_hybrid(model_type):
    """In training mode with gradient checkpointing, through the torch fallbacks of the Gated DeltaNet kernels:
    a row's logits and loss in a left-padded batch equal the row's alone, and the pad tokens' ids do not matter
    (neither the convolution nor the recurrent state sees a pad; on Qwen4-Exp neither do the n-gram embedding, which
    reads a pad as the end token, nor the sparse attention's indexer, which pools blocks of unpadded keys only)."""
    cfg = WarmStartConfig(model_type=model_type, hidden=64, vision_width=32,
                          text_layer_types=RELEASED_PATTERNS[model_type], layers=4)
    model, adapter = initial_model(cfg)
    model.train()
    model.gradient_checkpointing_enable()
    samples = _rows(adapter, cfg, 6)  # describer and locator rows: lengths differ, so the short ones are padded
    batch = adapter.build_batch([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])
    pads = (batch.inputs["attention_mask"] == 0).sum(1)
    assert pads.max() >= 3
    batched = model(**batch.inputs).logits.detach()
    for i, s in enumerate(samples):
        alone = adapter.build_batch([s.prompt], [s.image], [s.target])
        out = model(**alone.inputs, labels=alone.labels)
        n = alone.input_ids.shape[1]
        assert (batched[i, -n:] - out.logits[0].detach()).abs().max() < 1e-4, i
        in_batch = torch.nn.functional.cross_entropy(batched[i, -n:-1], alone.labels[0, 1:], ignore_index=-100)
        assert in_batch.item() == pytest.approx(out.loss.item(), abs=1e-5)
    other_pads = dict(batch.inputs, input_ids=torch.where(batch.inputs["attention_mask"].bool(), batch.input_ids,
                                                          adapter.encode_target("red")[0]))
    real = batch.inputs["attention_mask"].bool()
    assert (model(**other_pads).logits.detach() - batched)[real].abs().max() < 1e-5


def test_the_tiny_qwen4_exp_keeps_what_its_architecture_adds(tiny_checkpoint):
    """The tiny Qwen4-Exp is not a Qwen3.5-MoE under another name: its attention layer's indexer leaves tokens of a
    describer prompt out (the budget is shorter than the prompt, as 2,048 tokens are of a long context), the n-gram
    embedding sits before the first Gated DeltaNet layer, the residual is split into gated streams, and every layer
    routes through experts. The indexer's top-k is a hard choice: no gradient reaches its weights (docs/families.md)."""
    from sc_tune.modeling import load_model_and_adapter
    from tests.helpers import sample_images

    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen4_exp"))
    text = model.config.text_config
    kinds = [type(m).__name__ for m in model.modules()]
    assert text.layer_types == ["linear_attention", "indexed_attention"] and text.ple_layer_ids == [1]
    assert kinds.count("Qwen4ExpTextPLELayer") == 1 and text.hc_count > 1
    assert kinds.count("Qwen4ExpTextGatedResidual") == 2 * len(text.layer_types) + 1  # per block, and the final mix
    assert kinds.count("Qwen4ExpTextSparseMoeBlock") == len(text.layer_types)
    images, boxes = sample_images(adapter, n=2)
    batch = adapter.build_batch([adapter.describer_prompt(b, i) for b, i in zip(boxes, images)], images)
    selected = []
    indexer = next(m for m in model.modules() if type(m).__name__ == "Qwen4ExpTextQSAIndexer")
    handle = indexer.register_forward_hook(lambda module, args, out: selected.append(out))
    model(**batch.inputs).logits.sum().backward()
    handle.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if ".indexer." in n or ".ple." in n}
    assert all(g is None for n, g in grads.items() if ".indexer." in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".ple." in n)
    kept_B = selected[0][:, 0, -1].sum(-1)  # the keys the last prompt token attends to
    real_B = batch.inputs["attention_mask"].sum(1)
    assert (kept_B < real_B).all() and (kept_B >= text.indexer_budget).all(), (kept_B, real_B)


@pytest.fixture
def threads():
    """The script's ``main`` sets torch's thread count (its ``--threads``); put it back for the tests after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _diagnose_hybrid():
    return script_module("diagnose_hybrid")


def test_the_diagnosis_examples_are_the_warm_starts_samples_of_each_role():
    """``examples``: describer and locator samples alternate as the warm start makes them, ``role`` keeps one kind,
    and each sample comes with the object it is about."""
    script = _diagnose_hybrid()
    cfg = WarmStartConfig(model_type="qwen3_5", hidden=64, vision_width=32, text_layer_types="full_attention",
                          layers=1)
    _, adapter = initial_model(cfg)
    mixed, mixed_objects = script.examples(adapter, cfg, 5)
    describer, describer_objects = script.examples(adapter, cfg, 3, role="describer")
    locator, locator_objects = script.examples(adapter, cfg, 2, role="locator")
    assert len(mixed) == len(mixed_objects) == 5
    assert [s.prompt for s in describer] == [s.prompt for s in mixed[0::2]] and describer_objects == mixed_objects[0::2]
    assert [s.prompt for s in locator] == [s.prompt for s in mixed[1::2]] and locator_objects == mixed_objects[1::2]
    for sample, obj in zip(describer, describer_objects):
        assert sample.prompt == adapter.describer_prompt(obj.bbox, sample.image)
    for sample, obj in zip(locator, locator_objects):
        assert sample.prompt in {adapter.locator_prompt(query, sample.image)
                                 for query in (obj.full_caption, obj.terse_caption)}
    assert mixed_objects[0] is mixed_objects[1]  # one describer and one locator sample per object


@pytest.mark.parametrize("model_type, first_coordinates", [
    ("qwen3_5", ["523, 773, 727, 977]}", "23, 100, 200, 200]}", "100, 100, 200, 200]}", "600, 600, 900, 900]}"]),
    ("qwen2_vl", ["523,773),(727,977)", "23,100),(200,200)", "100,100),(200,200)", "600,600),(900,900)"])])
def test_box_to_answer_tokens_counts_from_the_first_coordinate(model_type, first_coordinates):
    """The distance the decay command uses starts at the box's first coordinate, in either family's box text: a
    coordinate of two digits sits a token nearer, and boxes equal to the two it compares against are found too.
    (It once counted from the 2 of ``bbox_2d``, four tokens before the box, and printed 38 where the box is 34.)"""
    script = _diagnose_hybrid()
    _, adapter = initial_model(WarmStartConfig(model_type=model_type, hidden=64, vision_width=32,
                                               text_layer_types="full_attention,full_attention", layers=2))
    image = adapter.prepare_image(Image.new("RGB", (128, 128)))
    boxes = [(0.5234375, 0.7734375, 0.7265625, 0.9765625), (0.0234375, 0.1, 0.2, 0.2), (0.1, 0.1, 0.2, 0.2),
             (0.6, 0.6, 0.9, 0.9)]
    distances = []
    for box, first in zip(boxes, first_coordinates):
        distance = script.box_to_answer_tokens(adapter, image, box)
        ids = adapter.encode_prompt(adapter.describer_prompt(box, image), image)
        assert adapter.tokenizer.decode(ids[-distance - 1:]).startswith(first), (box, distance)
        distances.append(distance)
    assert distances[0] - 1 == distances[1] == distances[2] - 1 == distances[3] - 1


def test_decay_command(capsys, threads):
    """``diagnose_hybrid.py decay`` (docs/notes/hybrid-qwen3_5.md's table): the farthest box of the warm start's
    describer prompts sits BOX_TO_ANSWER tokens from the answer; with transformers' init no head keeps anything of it,
    with the reference init at least three of six keep 10 %; every decay is a fraction, and what is left after the
    distance is at most the mean decay to that power (the mean of exp(g) is at least exp of the mean of g)."""
    script = _diagnose_hybrid()
    results = {}
    for init in ("transformers", "reference"):
        results[init] = script.main(["decay", "--init", init])
        assert json.loads(capsys.readouterr().out) == results[init]
    for result in results.values():
        assert result["box_to_answer_tokens"] == BOX_TO_ANSWER
        assert len(result["layers"]) == 3
        for layer in result["layers"].values():
            for decay, left in zip(layer["mean_decay_per_token"], layer["left_after_box_distance"]):
                assert 0 < decay < 1 and 0 <= left <= decay ** BOX_TO_ANSWER * (1 + 1e-5)
    left = {init: [x for layer in result["layers"].values() for x in layer["left_after_box_distance"]]
            for init, result in results.items()}
    assert max(left["transformers"]) < 1e-15
    assert sum(x > 0.1 for x in left["reference"]) >= 3, left["reference"]
    # A and the step are read from the layers: A is the same under both inits, the step is not.
    a = [layer["A"] for layer in results["reference"]["layers"].values()]
    assert a == [layer["A"] for layer in results["transformers"]["layers"].values()]
    steps = [s for layer in results["transformers"]["layers"].values() for s in layer["softplus_dt_bias"]]
    assert steps == pytest.approx([math.log1p(math.e)] * 6)


def test_padding_and_grads_commands(capsys, threads):
    """``padding``: a row alone equals it left-padded and the pad token's id moves nothing, while the control (the
    linear-attention layers' padding mask withheld) does move the real positions. ``grads``: with transformers' init
    the decay parameters get a far smaller gradient than with the reference init, though the token mixers get one."""
    script = _diagnose_hybrid()
    padding = script.main(["padding", "--rows", "4"])
    assert padding["training"] and padding["gradient_checkpointing"]
    assert max(r["pads"] for r in padding["rows"]) >= 3
    assert [r["real_tokens"] for r in padding["rows"]] == padding["widths"]
    assert all(r["real_tokens"] + r["pads"] == max(padding["widths"]) for r in padding["rows"])
    assert padding["max_logit_diff_alone_vs_batch"] < 1e-5 and padding["max_loss_diff_alone_vs_batch"] < 1e-5
    assert padding["max_logit_change_when_pad_token_changes"] < 1e-5
    assert 1e-2 < padding["control_without_linear_attention_mask"] < 1  # a leak, not the logits themselves
    # The summary is the worst row; a random model's loss is near ln(vocabulary), about 6 here.
    assert padding["max_logit_diff_alone_vs_batch"] == max(r["max_logit_diff"] for r in padding["rows"])
    assert padding["max_loss_diff_alone_vs_batch"] == max(abs(r["loss_alone"] - r["loss_in_batch"])
                                                          for r in padding["rows"])
    assert all(4 < r["loss_alone"] < 8 for r in padding["rows"]), padding["rows"]
    # Neither kernel package is installed here: the torch fallbacks ran, and the output says so.
    assert padding["kernels"] == {"is_flash_linear_attention_available": False, "is_causal_conv1d_available": False}
    grads = {init: script.main(["grads", "--init", init, "--rows", "4"]) for init in ("transformers", "reference")}
    capsys.readouterr()
    for result in grads.values():
        for role in ("describer", "locator"):
            parts = result[role]
            assert {f"layer {i} {part}" for i in range(3) for part in ("decay (A_log, dt_bias)", "linear_attn")} | {
                "layer 3 self_attn", "layer 0 mlp", "layer 3 norms"} <= set(parts)
            assert all(parts[f"layer {i} linear_attn"] > 0.1 for i in range(3))

    assert [script.layer_part(f"model.language_model.layers.{name}") for name in (
        "0.linear_attn.A_log", "0.linear_attn.dt_bias", "0.linear_attn.in_proj_qkvz.weight",
        "3.self_attn.q_proj.weight", "1.mlp.up_proj.weight", "2.input_layernorm.weight")] == [
        "layer 0 decay (A_log, dt_bias)", "layer 0 decay (A_log, dt_bias)", "layer 0 linear_attn", "layer 3 self_attn",
        "layer 1 mlp", "layer 2 norms"]
    assert script.layer_part("model.visual.blocks.0.mlp.fc1.weight") is None  # the vision tower is not counted

    def decay_norm(result):
        return math.sqrt(sum(v ** 2 for k, v in result["describer"].items() if k.endswith("(A_log, dt_bias)")))

    assert decay_norm(grads["reference"]) > 10 * decay_norm(grads["transformers"])


def test_overfit_command_scores_the_greedy_captions(capsys, threads):
    """``overfit`` (two steps here; the note's 300 fit all 16): the 16 describer examples' targets alternate full and
    terse captions, and the score counts the greedy captions equal to their targets."""
    result = _diagnose_hybrid().main(["overfit", "--steps", "2"])
    capsys.readouterr()
    assert [step for step, _ in result["loss_curve"]] == [1] and result["loss_curve"][0][1] > 1.0  # 1, 25, 50, ...
    assert 0 <= result["seconds"] < 60
    targets = [target for _, target in result["captions"]]
    assert len(targets) == 16
    full_and_terse = [(len(t.split()) > 2, len(u.split()) <= 2) for t, u in zip(targets[::2], targets[1::2])]
    assert all(full and terse for full, terse in full_and_terse), targets
    right = sum(caption == target for caption, target in result["captions"])
    assert 0 < right < 16 and result["greedy_captions_right"] == f"{right}/16"
