"""Mixture-of-experts models (Qwen3-VL-MoE, Qwen3.5-MoE, GLM-4.5V): LoRA on the fused routed experts
(``--lora_target_experts``, PEFT ``target_parameters``) and the router's load-balancing loss (``sc_tune.moe``)."""

from __future__ import annotations

import pytest
import torch

from sc_tune.adapters import family_for, supported_model_types
from sc_tune.arguments import ArgumentError, LoraArguments
from sc_tune.modeling import apply_lora, load_model_and_adapter
from tests.conftest import SAMPLE_DATA, SAMPLE_IMAGES

MOE_TYPES = [t for t in supported_model_types() if t.endswith("_moe")]
EXPERT_LORA = ("--use_lora", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0")


def test_the_moe_types_are_the_three_families():
    assert MOE_TYPES == ["glm4v_moe", "qwen3_5_moe", "qwen3_vl_moe"]


def _finetune(source, output_dir, *extra):
    import finetune

    return finetune.main([
        *("--model_name_or_path", source, "--data_path", SAMPLE_DATA, "--image_folder", SAMPLE_IMAGES),
        *("--output_dir", str(output_dir), "--per_device_train_batch_size", "2", "--describer_max_new_tokens", "4"),
        *("--locator_max_new_tokens", "4", "--describer_lr", "1e-3", "--locator_lr", "1e-3", "--weight_decay", "0"),
        *("--use_cpu", "True", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"),
        *("--skip_preflight", "True", "--seed", "0", *extra),
    ])  # fmt: skip


def _expert_params(model) -> dict[str, torch.Tensor]:
    """The routed experts' fused weights by plain name (PEFT's ``base_layer`` wrappers removed)."""
    plain = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in plain.items() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_lora_on_the_routed_experts_changes_their_effective_weights_and_merges(model_type, tiny_checkpoint, tmp_path):
    """Two locator steps (cross-entropy: a gradient on every step) with --lora_target_experts: each fused expert
    tensor gets a LoRA delta that moved off zero, the base tensors stay frozen, and the merged export holds
    base + delta, so it computes what the trained adapters computed."""
    from peft.tuners.lora.layer import ParamWrapper

    source = tiny_checkpoint(model_type)
    out = tmp_path / "out"
    trainer = _finetune(source, out, "--max_steps", "2", "--describer_update_steps", "0", "--locator_update_steps",
                        "2", "--lora_target_experts", "True", *EXPERT_LORA)  # fmt: skip
    base, _ = load_model_and_adapter(source)
    base_experts = _expert_params(base)
    assert base_experts and _expert_params(trainer.model).keys() == base_experts.keys()
    for name, tensor in _expert_params(trainer.model).items():
        assert torch.equal(tensor, base_experts[name]), name  # the base stays frozen
    wrappers = {n: m for n, m in trainer.model.named_modules() if isinstance(m, ParamWrapper)}
    assert len(wrappers) == len(base_experts)  # one wrapper per fused tensor
    deltas = {}
    for name, wrapper in wrappers.items():
        delta = wrapper.get_delta_weight("default")
        assert delta.shape == wrapper.get_param().shape and delta.abs().max() > 0, name
        plain = name.replace("base_model.model.", "").replace(".base_layer", "") + "." + wrapper.parameter_name
        deltas[plain] = delta.detach()
    assert deltas.keys() == base_experts.keys()

    merged, adapter = load_model_and_adapter(str(out))
    for name, tensor in _expert_params(merged).items():
        assert torch.allclose(tensor, base_experts[name] + deltas[name], atol=1e-6), name
        assert not torch.equal(tensor, base_experts[name]), name
    image = adapter.prepare_image(__import__("PIL.Image").Image.open(f"{SAMPLE_IMAGES}/images/000.png").convert("RGB"))
    batch = adapter.build_batch([adapter.locator_prompt("the red circle", image)], [image])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch.inputs).logits, trainer.model(**batch.inputs).logits, atol=1e-4)


def test_lora_target_experts_is_refused_on_a_dense_model_and_with_dropout(tiny_checkpoint):
    experts = LoraArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_experts=True)
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen3_vl"))
    with pytest.raises(ArgumentError, match="--lora_target_experts: .* not a mixture-of-experts model"):
        apply_lora(model, adapter, experts, False)
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen3_vl_moe"))
    dropout = LoraArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.05, lora_target_experts=True)
    with pytest.raises(ArgumentError, match="needs --lora_dropout 0"):
        apply_lora(model, adapter, dropout, False)
    assert family_for("qwen3_vl_moe").adapter.lora_target_expert_parameters
