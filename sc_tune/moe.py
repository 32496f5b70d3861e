"""Mixture-of-experts models: the router's load-balancing loss and LoRA on the routed experts.

Why SC-Tune adds a load-balancing term: under full fine-tuning the routers train too. SC-Tune's losses (the
clipped PPO objective and the locator's cross-entropy) say nothing about how tokens spread over experts, so
nothing keeps the routers from collapsing onto a few experts. The MoE models' own pre-training adds
``router_aux_loss_coef`` x their load-balancing loss to the LM loss; SC-Tune adds the same term to each of its
losses (``--moe_aux_loss``, on by default; ``--moe_aux_loss_coef`` overrides the config's coefficient). Under
LoRA the routers are frozen, so there is nothing to balance and the term is left out.

The routed experts are fused 3-D parameters (``mlp.experts.gate_up_proj`` / ``down_proj``; Gemma 4's
``experts.gate_up_proj`` / ``down_proj`` beside each layer's dense ``mlp``), not Linear modules, so PEFT's
``target_modules`` never reaches them; ``--lora_target_experts`` adds them through PEFT's ``target_parameters``
(the family's ``ModelAdapter.lora_expert_parameters``). Gemma 4's MoE defines no load-balancing loss, so none is
added for it.

PEFT 0.21 rewrites the LoRA config of a model whose transformers-4 layout differed (``glm4v_moe``, whose routed
experts were Linear ``gate_proj``/``up_proj``/``down_proj`` then) so that an adapter trained on transformers 4 still
loads: it moves those names from ``target_modules`` to the fused experts' ``target_parameters``. On a config
SC-Tune writes for the model as it is, that rewrite is wrong: plain LoRA then reached the routed experts (and
failed with the default ``--lora_dropout``, which PEFT's parameter wrapper refuses), and lost the shared experts'
and dense layers' ``down_proj``. ``as_configured`` switches it off around every PEFT call that injects an
adapter SC-Tune configured (``apply_lora``, the snapshot's second adapter, ``merge_lora``'s load).
"""

from __future__ import annotations

from contextlib import contextmanager

from sc_tune.arguments import ArgumentError


@contextmanager
def as_configured():
    """PEFT injects LoRA exactly where the config says (no transformers-4 MoE rewrite; see the module docstring)."""
    import peft.utils.transformers_weight_conversion as conversion

    rewrite = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda peft_config, model, conversions: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = rewrite


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
    if not hasattr(text_config(model), "router_aux_loss_coef"):
        # Gemma 4's MoE (26B-A4B) was released without a load-balancing loss: its config names no weight and its
        # forward returns no aux_loss, so there is no term to add. Asking for one is an error, not a crash mid-step.
        if override is not None:
            raise ArgumentError(f"--moe_aux_loss_coef {override:g}: {type(model).__name__} defines no router "
                                "load-balancing loss (its config has no router_aux_loss_coef); leave the flag out")
        return 0.0
    if override is not None:
        return float(override)
    return float(text_config(model).router_aux_loss_coef or 0.0)


def expert_parameters(model, names: tuple[str, ...]) -> list[str]:
    """Which of a family's expert parameter names (suffixes) this model has."""
    present = {n for n, _ in model.named_parameters()}
    return [name for name in names if any(p.endswith("." + name) for p in present)]
