"""LoRA through a phase switch: only adapter weights train, the snapshot adapter re-syncs, merge is exact."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from sc_tune.export import export_trained
from sc_tune.modeling import apply_lora, load_model_and_adapter
from sc_tune.snapshot import SNAPSHOT_ADAPTER
from tests.conftest import SAMPLE_IMAGES
from tests.helpers import caption_hash_reward, make_trainer, sample_images

LORA = SimpleNamespace(q_lora=False, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                       lora_target_experts=False)


def _lora(model, adapter):
    return apply_lora(model, adapter, LORA, gradient_checkpointing=False)


def _adapter_weights(model, name):
    return {n.replace(f".{name}.", "."): p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


def test_lora_phase_switch_and_merge(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen2_vl")
    trainer = make_trainer(
        source,
        str(tmp_path / "run"),
        model_transform=_lora,
        reward_fn=caption_hash_reward,  # with weight_decay 0, the describer moves the adapter only through it
        max_steps=5,
        describer_update_steps=1,
        locator_update_steps=2,
        ppo_epochs=2,
        kl_coef=0.05,
    )
    model = trainer.model
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for n, p in model.named_parameters() if f".{SNAPSHOT_ADAPTER}." in n)
    seen = {}
    original = trainer._begin_step

    def spy(step):
        policy_before = _adapter_weights(model, "default")
        original(step)
        seen[step] = (policy_before, _adapter_weights(model, SNAPSHOT_ADAPTER))

    trainer._begin_step = spy
    trainer.train()

    # only the policy adapter trained: every base weight is bit-identical
    for name, value in base_before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    policy_at_2, snapshot_at_2 = seen[2]
    assert any(not torch.equal(policy_at_2[k], seen[0][0][k]) for k in policy_at_2)  # describer moved it
    for step in (2, 4):  # re-synced at each switch, adapter weights only
        policy, snapshot = seen[step]
        assert all(torch.equal(policy[k], snapshot[k]) for k in policy)
    assert any(not torch.equal(seen[4][1][k], snapshot_at_2[k]) for k in snapshot_at_2)
    assert torch.equal(seen[3][1][next(iter(snapshot_at_2))], snapshot_at_2[next(iter(snapshot_at_2))])

    # merge: one command's worth of work, and the merged model computes the LoRA model's logits
    out = tmp_path / "export"
    export_trained(trainer, str(out), source, use_lora=True)
    assert (out / "lora_adapter" / "adapter_config.json").exists()
    merged, adapter = load_model_and_adapter(str(out))
    image = adapter.prepare_image(Image.open(f"{SAMPLE_IMAGES}/images/000.png"))
    batch = adapter.build_batch([adapter.describer_prompt([0.1, 0.2, 0.5, 0.6], image)], [image])
    model.eval()
    with torch.no_grad():
        expected = model(**batch.inputs).logits
        got = merged(**batch.inputs).logits
    assert torch.allclose(got, expected, atol=1e-5)
    base, _ = load_model_and_adapter(source)
    with torch.no_grad():
        assert not torch.allclose(base(**batch.inputs).logits, expected, atol=1e-5)  # the adapter mattered


def test_merge_command_keeps_the_saved_dtype_unless_told(tiny_checkpoint, tmp_path):
    """python -m sc_tune.export: a float32 base stays float32 (it used to become bfloat16); --dtype overrides, merged
    into the folder of the first merge, which it replaces."""
    from peft import LoraConfig, get_peft_model

    from sc_tune.export import main as export_main

    base = tiny_checkpoint("qwen2_vl")  # saved in float32
    model, adapter = load_model_and_adapter(base)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=adapter.lora_target_modules))
    lora.save_pretrained(tmp_path / "adapter")
    for flag, expected in (([], torch.float32), (["--dtype", "bfloat16"], torch.bfloat16)):
        out = tmp_path / "merged"  # the second merge replaces the first's export
        export_main(["--base", base, "--adapter", str(tmp_path / "adapter"), "--output", str(out), *flag])
        merged, _ = load_model_and_adapter(str(out), dtype="auto")
        assert {p.dtype for p in merged.parameters()} == {expected}, flag


def test_trainable_summary_says_lora_freezes_the_merger(tiny_checkpoint):
    from sc_tune.modeling import freeze_vision_tower, trainable_summary

    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_vl"))
    freeze_vision_tower(model, adapter)
    full = trainable_summary(model, adapter)
    assert "vision resampler/merger" in full.split("frozen:")[0] and full.endswith("frozen: vision tower")
    lora = trainable_summary(_lora(model, adapter), adapter)
    trained, frozen = lora.split("frozen:")
    assert "LoRA adapters" in trained and "merger" not in trained and "language model" not in trained
    assert frozen.strip() == "vision resampler/merger, vision tower, language model"


def test_the_adapter_snapshot_runs_without_dropout_and_leaves_the_policy_training(tiny_checkpoint, tmp_path):
    # LoRA dropout is on for the policy; the snapshot, a frozen reference, must score and generate deterministically.
    noisy = SimpleNamespace(**{**vars(LORA), "lora_dropout": 0.5})
    trainer = make_trainer(
        tiny_checkpoint("qwen2_vl"),
        str(tmp_path / "run"),
        model_transform=lambda model, adapter: apply_lora(model, adapter, noisy, gradient_checkpointing=False),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False},
    )
    model = trainer.model
    with torch.no_grad():  # fresh adapters add nothing (B = 0), and dropout on nothing changes nothing
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    # as train() does, with the run's kwargs (which the snapshot's generation must restore, not the defaults)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    model.train()
    images, boxes = sample_images(trainer.adapter, n=2)
    prompts = [trainer.adapter.describer_prompt(b, im) for b, im in zip(boxes, images)]
    batch = trainer.adapter.build_batch(prompts, images)
    with trainer.snapshot.scoring() as snapshot, torch.no_grad():
        assert not any(m.training for m in model.modules()), "the snapshot scores in eval mode"
        first, second = (snapshot(**batch.inputs, use_cache=False).logits for _ in range(2))
    assert torch.equal(first, second)
    with torch.no_grad():  # the policy itself still trains with dropout, so its passes differ
        assert not torch.equal(model(**batch.inputs).logits, model(**batch.inputs).logits)
    with trainer.snapshot.generating() as snapshot:
        assert not snapshot.training and not snapshot.is_gradient_checkpointing
    assert all(m.training for m in model.modules()), "every module's training mode comes back"
    assert model.is_gradient_checkpointing
    checkpointed = [getattr(m, "_gradient_checkpointing_func", None) for m in model.modules()]
    checkpointed = [f for f in checkpointed if f is not None]
    assert checkpointed and all(f.keywords == trainer.args.gradient_checkpointing_kwargs for f in checkpointed)



@pytest.mark.parametrize("lora", [True, False], ids=["adapter_snapshot", "full_copy_snapshot"])
def test_generation_leaves_no_hook_behind_on_the_input_embeddings(tiny_checkpoint, tmp_path, lora):
    # TRL turns gradient checkpointing off and on around every generation, and transformers adds an input-embedding
    # hook at each turn-on: before sc_tune.snapshot.unwrapped_for_generation, each rollout left hooks behind that
    # every later forward ran (and that made a compiled decode step recompile at every call).
    trainer = make_trainer(
        tiny_checkpoint("qwen2_vl"),
        str(tmp_path / "run"),
        model_transform=(lambda model, adapter: apply_lora(model, adapter, LORA, gradient_checkpointing=True))
        if lora else None,
        max_steps=4,
        describer_update_steps=1,
        locator_update_steps=1,
        gradient_checkpointing=True,
    )
    model = trainer.model
    embedding = model.get_input_embeddings()

    def hooks():  # every hook on every module (the embeddings' own, the vision cache's, the fused decoding's, ...)
        kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        return len(embedding._forward_hooks), sum(len(getattr(m, kind)) for m in model.modules() for kind in kinds)

    counts = {}
    original = trainer._begin_step

    def spy(step):
        original(step)
        counts[step] = hooks()

    trainer._begin_step = spy
    trainer.train()
    assert set(counts) == {0, 1, 2, 3}  # two describer and two locator steps, each with its generations
    assert counts[0][0] >= 1, "gradient checkpointing needs its input-embedding hook"
    assert len(set(counts.values())) == 1 and hooks() == counts[0], counts
    # and the handles transformers keeps to remove them (disable_input_require_grads) are still the registered ones
    from transformers import PreTrainedModel

    held = [handle for module in model.modules() if isinstance(module, PreTrainedModel)
            for handle in module.__dict__.get("_require_grads_hooks") or []]  # fmt: skip
    assert held and all(handle.id in handle.hooks_dict_ref() for handle in held)


def _model_of(sizes: dict[str, int]) -> torch.nn.Module:
    """A module holding one 1-D parameter of each given size under each dotted name."""
    root = torch.nn.Module()
    for name, size in sizes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(size)))
    return root


def test_fix_vit_freezes_the_tower_but_its_merger_and_the_summary_counts_every_part():
    """Sizes chosen so that each count shows in the summary's two decimals of millions (1,505,001 -> 1.51M)."""
    from sc_tune.modeling import freeze_vision_tower, trainable_summary

    adapter = SimpleNamespace(vision_prefix="visual", vision_trainable_prefixes=("visual.merger",))
    model = _model_of({"visual.merger.weight": 1_505_001, "visual.blocks.weight": 2_250_000,
                       "model.layers.weight": 3_250_000, "visualiser.bias": 10_001})  # not in "visual."
    assert trainable_summary(model, adapter) == (
        "trainable parameters: 7.02M of 7.02M (vision resampler/merger 1.51M, vision tower 2.25M, language model 3.26M);"
        " frozen: nothing")
    assert freeze_vision_tower(model, adapter) == 2_250_000
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["visual.blocks.weight"]
    assert trainable_summary(model, adapter) == (
        "trainable parameters: 4.77M of 7.02M (vision resampler/merger 1.51M, language model 3.26M); frozen: vision tower")
    # Under PEFT (its wrapper's prefix, every base weight frozen) only the LoRA weights train.
    peft = _model_of({"base_model.model.visual.merger.weight": 1_505_001, "base_model.model.visual.blocks.weight": 7,
                      "base_model.model.model.layers.weight": 3_250_000,
                      "base_model.model.model.layers.lora_A.default.weight": 15_001})
    for name, param in peft.named_parameters():
        param.requires_grad_("lora_" in name)
    assert trainable_summary(peft, adapter) == (
        "trainable parameters: 0.02M of 4.77M (LoRA adapters 0.02M); "
        "frozen: vision resampler/merger, vision tower, language model")
    with pytest.raises(ValueError, match="fix_vit froze nothing: no parameter starts with 'visual'"):
        freeze_vision_tower(_model_of({"model.layers.weight": 3}), adapter)


def test_lora_wraps_the_named_modules_or_the_familys_and_qlora_quantises_as_its_paper(tiny_checkpoint):
    from sc_tune.modeling import qlora_quantization_config

    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_vl"))

    def wrapped(peft_model):
        return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}

    family = wrapped(_lora(model, adapter))  # the family's: the language model's projections, nothing of the tower
    assert {n.split(".")[-1] for n in family} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert all(n.startswith("model.language_model.layers.") for n in family)
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_vl"))
    only_v = SimpleNamespace(**{**vars(LORA), "lora_target_modules": ["v_proj"]})
    assert {n.split(".")[-1] for n in wrapped(apply_lora(model, adapter, only_v, gradient_checkpointing=False))} == {
        "v_proj"}
    # QLoRA (Dettmers et al., 2023): 4-bit NormalFloat weights, double quantisation, computing in the run's dtype.
    config = qlora_quantization_config(torch.bfloat16)
    assert (config.load_in_4bit, config.load_in_8bit, config.bnb_4bit_quant_type) == (True, False, "nf4")
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16
