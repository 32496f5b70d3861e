"""MoE: the router's load-balancing loss joins SC-Tune's losses under full fine-tuning; LoRA reaches the experts."""

from __future__ import annotations

import re

import pytest
import torch

from sc_tune.arguments import LoraArguments
from sc_tune.modeling import apply_lora
from tests.helpers import make_trainer


@pytest.fixture(scope="module")
def moe_checkpoint(tiny_checkpoint):
    return tiny_checkpoint("qwen3_vl_moe")


@pytest.fixture(scope="module")
def gemma4_moe_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A tiny Gemma 4 with the MoE block of its 26B-A4B release (``model_type`` gemma4, ``enable_moe_block``): routed
    experts beside every layer's dense MLP, and no load-balancing loss."""
    import os
    import shutil

    from transformers import AutoConfig, AutoModelForImageTextToText

    dense = tiny_checkpoint("gemma4")
    config = AutoConfig.from_pretrained(dense)
    config.text_config.update({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                               "moe_intermediate_size": 16})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config)
    folder = tmp_path_factory.mktemp("tiny_gemma4_moe")
    model.save_pretrained(folder)
    for name in os.listdir(dense):  # the tokenizer, template and processor files
        if not (folder / name).exists():
            shutil.copy(os.path.join(dense, name), folder / name)
    return str(folder)


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


# qwen4_exp: every layer routes, between gated residual streams (its router logits are recorded inside them).
@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "qwen4_exp"])
def test_full_fine_tuning_adds_the_router_load_balancing_term(tiny_checkpoint, model_type, tmp_path):
    moe_checkpoint = tiny_checkpoint(model_type)
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


def test_gemma4_moe_has_no_load_balancing_term_and_refuses_a_weight_for_one(gemma4_moe_checkpoint, tmp_path):
    """Gemma 4's MoE defines no load-balancing loss (no router_aux_loss_coef, no aux_loss in its outputs): under full
    fine-tuning no term is added, and --moe_aux_loss_coef is refused by name before a step instead of failing on
    the missing aux_loss inside the first one."""
    from sc_tune.arguments import ArgumentError

    trainer = make_trainer(gemma4_moe_checkpoint, str(tmp_path / "default"))
    assert trainer.router_aux_coef == 0.0 and trainer.model.config.text_config.num_experts == 4
    with pytest.raises(ArgumentError, match="--moe_aux_loss_coef 0.5: Gemma4ForConditionalGeneration defines no"):
        make_trainer(gemma4_moe_checkpoint, str(tmp_path / "weighted"), moe_aux_loss_coef=0.5)


def test_lora_target_experts_refuses_a_dense_model(tiny_checkpoint):
    from sc_tune.modeling import load_model_and_adapter

    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen3_vl"))
    experts = list(adapter.lora_expert_parameters)  # the names Qwen3-VL-MoE's routed experts go by
    with pytest.raises(ValueError, match=re.escape(f"Qwen3VLForConditionalGeneration has no routed-expert parameters "
                                                   f"{experts}: it is not a MoE model")):
        apply_lora(model, adapter, LoraArguments(use_lora=True, lora_r=4, lora_target_experts=True), False)
    model, adapter = load_model_and_adapter(tiny_checkpoint("llava"))  # a family that names none
    with pytest.raises(ValueError, match=re.escape("LlavaForConditionalGeneration has no routed-expert parameters "
                                                   "(this family names none): it is not a MoE model")):
        apply_lora(model, adapter, LoraArguments(use_lora=True, lora_r=4, lora_target_experts=True), False)


# ---------------------------------------------------------------- --lora_target_experts through finetune.py
MOE_TYPES = ["glm4v_moe", "qwen3_5_moe", "qwen3_vl_moe", "qwen4_exp"]
EXPERT_LORA = ("--use_lora", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
               "--lora_target_experts", "True")  # fmt: skip


def test_the_moe_types_are_every_registered_moe():
    """By the released architecture, not the name: a model_type whose default config (the release's) routes experts
    (``qwen4_exp`` has no ``_moe`` suffix). Gemma 4's 26B-A4B shares the dense ``gemma4`` type (its own test below)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from sc_tune.adapters import supported_model_types
    from sc_tune.moe import num_routed_experts

    def routes(model_type):
        try:
            config = AutoConfig.for_model(model_type)
        except ValueError:  # Qwen-VL: remote code, no transformers config (and dense)
            return False
        return num_routed_experts(SimpleNamespace(config=config)) > 0

    assert MOE_TYPES == [t for t in supported_model_types() if routes(t)]


def _finetune(source, output_dir, *extra):
    import finetune
    from tests.conftest import SAMPLE_DATA, SAMPLE_IMAGES

    return finetune.main([
        *("--model_name_or_path", source, "--data_path", SAMPLE_DATA, "--image_folder", SAMPLE_IMAGES),
        *("--output_dir", str(output_dir), "--per_device_train_batch_size", "2", "--describer_max_new_tokens", "4"),
        *("--locator_max_new_tokens", "4", "--describer_lr", "1e-3", "--locator_lr", "1e-3", "--weight_decay", "0"),
        *("--use_cpu", "True", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"),
        *("--skip_preflight", "True", "--seed", "0", "--max_steps", "3", "--describer_update_steps", "1"),
        *("--locator_update_steps", "1", "--ppo_epochs", "1", *extra),
    ])  # fmt: skip


def _plain(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def _experts(model) -> dict[str, torch.Tensor]:
    """The routed experts' fused weights by plain name (PEFT's ``base_layer`` wrappers removed)."""
    return {_plain(n): p.detach().clone() for n, p in model.named_parameters()
            if _plain(n).endswith(("experts.gate_up_proj", "experts.down_proj"))}  # fmt: skip


@pytest.mark.parametrize("model_type", [*MOE_TYPES, "gemma4 (26B-A4B's MoE block)"])
def test_expert_lora_through_finetune_syncs_the_snapshot_and_merges_into_the_export(model_type, tiny_checkpoint,
                                                                                   tmp_path, request):
    """describer, locator, describer with --lora_target_experts: every fused expert tensor gets a LoRA delta that
    moved off zero while the base stays frozen; the snapshot (a second adapter on the same wrapped parameters)
    is re-synced at the switch back, experts included (the describer's first KL is 0 again); and the merged
    export holds base + delta, so it computes what the trained adapters computed."""
    from peft.tuners.lora.layer import ParamWrapper
    from PIL import Image

    from sc_tune.modeling import load_model_and_adapter
    from tests.conftest import SAMPLE_IMAGES

    if model_type.startswith("gemma4"):
        source = request.getfixturevalue("gemma4_moe_checkpoint")
    else:
        source = tiny_checkpoint(model_type)
    out = tmp_path / "out"
    trainer = _finetune(source, out, *EXPERT_LORA)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["phase"] for h in logs] == ["describer", "locator", "describer"]
    assert abs(logs[2]["describer/kl"]) < 1e-7  # the snapshot took the locator step's expert deltas too

    base, _ = load_model_and_adapter(source)
    base_experts = _experts(base)
    assert base_experts and _experts(trainer.model).keys() == base_experts.keys()
    for name, tensor in _experts(trainer.model).items():
        assert torch.equal(tensor, base_experts[name]), name  # the base stays frozen
    wrappers = {n: m for n, m in trainer.model.named_modules() if isinstance(m, ParamWrapper)}
    deltas = {_plain(n) + "." + m.parameter_name: m.get_delta_weight("default").detach() for n, m in wrappers.items()}
    assert deltas.keys() == base_experts.keys()  # one wrapper per fused tensor
    for name, delta in deltas.items():
        assert delta.shape == base_experts[name].shape and delta.abs().max() > 0, name

    merged, adapter = load_model_and_adapter(str(out))
    for name, tensor in _experts(merged).items():
        assert torch.allclose(tensor, base_experts[name] + deltas[name], atol=1e-6), name
    image = adapter.prepare_image(Image.open(f"{SAMPLE_IMAGES}/images/000.png").convert("RGB"))
    batch = adapter.build_batch([adapter.locator_prompt("the red circle", image)], [image])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch.inputs).logits, trainer.model(**batch.inputs).logits, atol=1e-4)


def test_lora_target_experts_with_dropout_is_refused_by_name(moe_checkpoint):
    from sc_tune.arguments import ArgumentError
    from sc_tune.modeling import load_model_and_adapter

    model, adapter = load_model_and_adapter(moe_checkpoint)
    dropout = LoraArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.05, lora_target_experts=True)
    with pytest.raises(ArgumentError, match="--lora_target_experts needs --lora_dropout 0"):
        apply_lora(model, adapter, dropout, False)


def test_plain_lora_on_glm_moe_targets_what_the_adapter_names_with_the_default_dropout(tiny_checkpoint):
    """PEFT 0.21 rewrites a LoRA config for models whose transformers-4 layout differed (glm4v_moe): it turns the
    projection names into the fused experts' target_parameters, so plain LoRA failed with the default
    --lora_dropout 0.05 ("lora.ParamWrapper does not work with lora_dropout != 0"), and with dropout 0 it trained
    the routed experts while dropping the shared experts' and dense layers' down_proj. Every module the adapter's
    regex names gets LoRA, and the routed experts only with --lora_target_experts."""
    import re

    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import ParamWrapper

    from sc_tune.modeling import load_model_and_adapter

    model, adapter = load_model_and_adapter(tiny_checkpoint("glm4v_moe"))
    named = [n for n, m in model.named_modules() if re.fullmatch(adapter.lora_target_modules, n)]
    assert any(n.endswith("shared_experts.down_proj") for n in named)
    lora = apply_lora(model, adapter, LoraArguments(use_lora=True, lora_r=4, lora_alpha=8), False)  # dropout 0.05
    wrapped = {_plain(n) for n, m in lora.named_modules() if isinstance(m, LoraLinear)}
    assert wrapped == set(named)
    assert not any(isinstance(m, ParamWrapper) for m in lora.modules())
    assert not lora.peft_config["default"].target_parameters

    model, adapter = load_model_and_adapter(tiny_checkpoint("glm4v_moe"))
    experts = LoraArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_experts=True)
    lora = apply_lora(model, adapter, experts, False)
    assert {_plain(n) for n, m in lora.named_modules() if isinstance(m, LoraLinear)} == set(named)
    assert sum(isinstance(m, ParamWrapper) for m in lora.modules()) == len(_experts(lora)) > 0


def test_the_load_balancing_weight_is_the_configs_own_zero_where_it_sets_none_and_never_for_a_dense_model():
    from types import SimpleNamespace

    from sc_tune.moe import router_aux_coefficient

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert router_aux_coefficient(model(num_experts=4, router_aux_loss_coef=0.01), True, None, False) == 0.01
    assert router_aux_coefficient(model(num_experts=4, router_aux_loss_coef=0.01), True, 0.5, False) == 0.5
    for unset in (0.0, None):  # a config that sets no weight adds no term
        assert router_aux_coefficient(model(num_experts=4, router_aux_loss_coef=unset), True, None, False) == 0.0
    assert router_aux_coefficient(model(num_experts=0, router_aux_loss_coef=0.01), True, None, False) == 0.0  # dense
    assert router_aux_coefficient(model(num_experts=4, router_aux_loss_coef=0.01), True, None, True) == 0.0  # LoRA
