"""MoE: the router's load-balancing loss joins SC-Tune's losses under full fine-tuning; LoRA reaches the experts."""

from __future__ import annotations

import pytest
import torch

from sc_tune.arguments import LoraArguments
from sc_tune.modeling import apply_lora
from tests.helpers import make_trainer


@pytest.fixture(scope="module")
def moe_checkpoint(tiny_checkpoint):
    return tiny_checkpoint("qwen3_vl_moe")


def _locator_loss_and_aux(trainer):
    """The locator loss of one rollout, and the model's load-balancing loss on the same inputs, by hand."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.snapshot.sync_from_policy()
    rollout = trainer.cycle.locator_rollout(batch).rollout
    model = trainer.model.train()
    loss = trainer.compute_loss(model, rollout)
    with torch.no_grad():
        aux = model(**rollout.inputs, output_router_logits=True, use_cache=False).aux_loss
    return loss, aux


def test_full_fine_tuning_adds_the_router_load_balancing_term(moe_checkpoint, tmp_path):
    on = make_trainer(moe_checkpoint, str(tmp_path / "on"), moe_aux_loss_coef=0.5)
    off = make_trainer(moe_checkpoint, str(tmp_path / "off"), moe_aux_loss=False, moe_aux_loss_coef=0.5)
    assert on.router_aux_coef == 0.5 and off.router_aux_coef == 0.0
    torch.manual_seed(1)
    loss_on, aux = _locator_loss_and_aux(on)
    torch.manual_seed(1)
    loss_off, _ = _locator_loss_and_aux(off)
    assert float(aux) > 0
    assert float(loss_on - loss_off) == pytest.approx(0.5 * float(aux), rel=1e-4)
    assert on._metrics["moe/aux_loss"] == [pytest.approx(float(aux), rel=1e-4)]
    default = make_trainer(moe_checkpoint, str(tmp_path / "default"))
    assert default.router_aux_coef == default.model.config.text_config.router_aux_loss_coef  # the model's own


def test_no_term_for_dense_models_or_under_lora(tiny_checkpoint, moe_checkpoint, tmp_path):
    assert make_trainer(tiny_checkpoint("qwen3_vl"), str(tmp_path / "dense")).router_aux_coef == 0.0

    def lora(model, adapter):
        return apply_lora(model, adapter, LoraArguments(use_lora=True, lora_r=4, lora_alpha=8), False)

    assert make_trainer(moe_checkpoint, str(tmp_path / "lora"), model_transform=lora).router_aux_coef == 0.0


def test_lora_target_experts_trains_the_routed_experts(moe_checkpoint, tmp_path):
    from sc_tune.modeling import load_model_and_adapter

    def lora_experts(model, adapter):
        args = LoraArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_experts=True)
        return apply_lora(model, adapter, args, False)

    trainer = make_trainer(moe_checkpoint, str(tmp_path / "t"), model_transform=lora_experts, max_steps=2,
                           describer_update_steps=0, locator_update_steps=2)
    expert_lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                   if "experts" in n and "lora_B" in n and ".default." in n}
    assert expert_lora and all(float(p.abs().sum()) == 0 for p in expert_lora.values())  # LoRA's B starts at 0
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if n in expert_lora and float(p.abs().sum()) > 0]
    assert moved, "the experts' LoRA weights did not train"
    # Merged, the experts' effective weights differ from the base model's.
    merged = trainer.model.merge_and_unload()
    base, _ = load_model_and_adapter(moe_checkpoint)
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.allclose(dict(merged.named_parameters())[name], dict(base.named_parameters())[name])


def test_lora_target_experts_refuses_a_dense_model(tiny_checkpoint):
    from sc_tune.modeling import load_model_and_adapter

    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen3_vl"))
    with pytest.raises(ValueError, match="not a MoE model"):
        apply_lora(model, adapter, LoraArguments(use_lora=True, lora_r=4, lora_target_experts=True), False)
