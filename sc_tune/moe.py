"""Mixture-of-experts models: the router's load-balancing loss and LoRA on the routed experts.

Why SC-Tune adds a load-balancing term: under full fine-tuning the routers train too. SC-Tune's losses (the
clipped PPO objective and the locator's cross-entropy) say nothing about how tokens spread over experts, so
nothing keeps the routers from collapsing onto a few experts. The MoE models' own pre-training adds
``router_aux_loss_coef`` x their load-balancing loss to the LM loss; SC-Tune adds the same term to each of its
losses (``--moe_aux_loss``, on by default; ``--moe_aux_loss_coef`` overrides the config's coefficient). Under
LoRA the routers are frozen, so there is nothing to balance and the term is left out.

The routed experts are fused 3-D parameters (``mlp.experts.gate_up_proj`` / ``down_proj``), not Linear modules,
so PEFT's ``target_modules`` never reaches them; ``--lora_target_experts`` adds them through PEFT's
``target_parameters`` (the family's ``ModelAdapter.lora_expert_parameters``).
"""

from __future__ import annotations


def text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def num_routed_experts(model) -> int:
    config = text_config(model)
    return int(getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None) or 0)


def router_aux_coefficient(model, enabled: bool, override: float | None, lora: bool) -> float:
    """The weight of the load-balancing term in SC-Tune's losses (0: not added)."""
    if not enabled or lora or num_routed_experts(model) == 0:
        return 0.0
    if override is not None:
        return float(override)
    return float(getattr(text_config(model), "router_aux_loss_coef", 0.0) or 0.0)


def expert_parameters(model, names: tuple[str, ...]) -> list[str]:
    """Which of a family's expert parameter names (suffixes) this model has."""
    present = {n for n, _ in model.named_parameters()}
    return [name for name in names if any(p.endswith("." + name) for p in present)]
