"""Every numeric knob of ``SCTuneConfig`` at its bound: accepted there, refused just past it with a message naming the
flag, the value and the rule; non-finite values refused but where +inf means "never"; the settings checked across
knobs after them. ``test_cli.py`` drives the same checks through ``finetune.py``'s command line."""

import dataclasses
import json
import math
import re
import socket

import pytest

from sc_tune.arguments import ArgumentError, SCTuneConfig


def config(tmp_path, **fields) -> SCTuneConfig:
    return SCTuneConfig(output_dir=str(tmp_path), use_cpu=True, **fields)


def refusal(tmp_path, **fields) -> str:
    with pytest.raises(ArgumentError) as error:
        config(tmp_path, **fields)
    return str(error.value)


# (field, the value at its bound that is accepted, the nearest value past the bound that is refused, the rule's words,
# other fields the values need). A two-sided range has a row per side.
BOUNDS = [
    ("describer_lr", 1e-30, 0.0, "must be > 0", {}),
    ("locator_lr", 1e-30, 0.0, "must be > 0", {}),
    ("kl_coef", 0.0, -1e-9, "must be >= 0", {}),
    ("kl_target", 1e-9, 0.0, "must be > 0", {}),
    ("kl_horizon", 1e-9, 0.0, "must be > 0", {}),
    ("clip_range", 1e-9, 0.0, "must be > 0", {}),
    ("gamma", 0.0, -1e-9, "must be in [0, 1]", {}),
    ("gamma", 1.0, 1.000001, "must be in [0, 1]", {}),
    ("ratio_threshold", 1e-9, 0.0, "must be > 0", {}),
    ("policy_kl_stop", 1e-9, 0.0, "must be > 0", {}),
    ("describer_top_p", 1e-9, 0.0, "must be in (0, 1]", {}),
    ("describer_top_p", 1.0, 1.000001, "must be in (0, 1]", {}),
    ("describer_top_k", 0, -1, "must be >= 0 (0: no top-k filter)", {}),
    ("describer_temperature", 1e-9, 0.0, "must be > 0", {}),
    ("weight_decay", 0.0, -1e-9, "must be >= 0", {}),
    ("adam_beta1", 0.0, -1e-9, "must be in [0, 1)", {}),
    ("adam_beta1", 0.999999, 1.0, "must be in [0, 1)", {}),
    ("adam_beta2", 0.0, -1e-9, "must be in [0, 1)", {}),
    ("adam_beta2", 0.999999, 1.0, "must be in [0, 1)", {}),
    ("adam_epsilon", 1e-30, 0.0, "must be > 0", {}),
    ("gradient_accumulation_steps", 1, 0, "must be >= 1", {}),
    ("ppo_epochs", 1, 0, "must be >= 1", {}),
    ("describer_update_steps", 0, -1, "must be >= 0", {}),
    ("locator_update_steps", 0, -1, "must be >= 0", {}),
    ("per_device_train_batch_size", 1, 0, "must be >= 1", {}),
    ("preflight_samples", 1, 0, "must be >= 1", {}),
    ("preflight_max_parse_failures", 0.0, -1e-9, "must be in [0, 1]", {}),
    ("preflight_max_parse_failures", 1.0, 1.000001, "must be in [0, 1]", {}),
    ("preflight_min_accuracy", 0.0, -1e-9, "must be in [0, 1]", {}),
    ("preflight_min_accuracy", 1.0, 1.000001, "must be in [0, 1]", {}),
    ("moe_aux_loss_coef", 0.0, -1e-9, "must be >= 0", {}),
    ("describer_max_new_tokens", 1, 0, "must be >= 1", {"describer_min_new_tokens": 0}),
    ("locator_max_new_tokens", 1, 0, "must be >= 1", {"locator_min_new_tokens": 0}),
    ("describer_min_new_tokens", 0, -1, "must be in [0, --describer_max_new_tokens 30]", {}),
    ("describer_min_new_tokens", 30, 31, "must be in [0, --describer_max_new_tokens 30]", {}),
    ("locator_min_new_tokens", 0, -1, "must be in [0, --locator_max_new_tokens 20]", {}),
    ("locator_min_new_tokens", 20, 21, "must be in [0, --locator_max_new_tokens 20]", {}),
    ("pseudo_label_min_iou", 0.0, -1e-9, "must be in [0, 1]", {}),
    ("pseudo_label_min_iou", 1.0, 1.000001, "must be in [0, 1]", {}),
]


@pytest.mark.parametrize(("name", "accepted", "refused", "rule", "others"), BOUNDS,
                         ids=[f"{row[0]}={row[2]}" for row in BOUNDS])
def test_a_knob_is_accepted_at_its_bound_and_refused_just_past_it(tmp_path, name, accepted, refused, rule, others):
    assert getattr(config(tmp_path, **{name: accepted}, **others), name) == accepted
    assert refusal(tmp_path, **{name: refused}, **others) == f"invalid arguments: --{name} {refused!r} {rule}"


def test_every_broken_rule_is_named_in_one_message(tmp_path):
    assert refusal(tmp_path, kl_coef=-1.0, ppo_epochs=0, describer_lr=math.nan) == (
        "invalid arguments: --describer_lr nan must be a finite number; --kl_coef -1.0 must be >= 0; "
        "--ppo_epochs 0 must be >= 1")


FLOAT_KNOBS = ["describer_lr", "locator_lr", "pseudo_label_min_iou", "kl_coef", "kl_target", "kl_horizon", "clip_range",
               "gamma", "ratio_threshold", "policy_kl_stop", "describer_top_p", "describer_temperature", "weight_decay",
               "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm"]
# +inf means "never" for these: never skip an update, never stop the epochs, never clip.
GUARDS = {"ratio_threshold", "policy_kl_stop", "max_grad_norm"}


@pytest.mark.parametrize("name", FLOAT_KNOBS)
def test_a_float_knob_that_is_not_finite_is_refused_as_such_but_a_guards_positive_infinity(tmp_path, name):
    """Refused as not finite, and only as that (``inf > 0`` holds, ``-inf`` breaks the rule too: one reason is
    given, not two)."""
    for value in (math.nan, -math.inf, *(() if name in GUARDS else (math.inf,))):
        assert refusal(tmp_path, **{name: value}) == f"invalid arguments: --{name} {value!r} must be a finite number"
    if name in GUARDS:
        assert getattr(config(tmp_path, **{name: math.inf}), name) == math.inf


@pytest.mark.parametrize(("fields", "message"), [
    ({"describer_update_steps": 0, "locator_update_steps": 0},
     "describer_update_steps and locator_update_steps cannot both be 0"),
    ({"num_generations": 0}, "--num_generations must be >= 1"),
    ({"kl_controller": "pid"}, "--kl_controller must be one of fixed, adaptive, got 'pid'"),
    ({"static_decoding": "yes"}, "--static_decoding must be auto, true or false, got 'yes'"),
    ({"fused_decoding": "maybe"}, "--fused_decoding must be auto, true or false, got 'maybe'"),
    ({"static_decoding": "False", "decoding_compile_backend": "inductor"},
     "--decoding_compile_backend compiles the static decoding step: it needs --static_decoding auto or true"),
    ({"max_steps": 0}, "set --max_steps: SC-Tune streams its data and stops by step count"),
    ({"remove_unused_columns": True}, "--remove_unused_columns must be False: SC-Tune samples carry PIL images"),
    ({"learning_rate": 1e-5}, "--learning_rate 1e-05 is not used by SC-Tune: the learning rate is set per phase"),
    ({"lr_scheduler_type": "cosine"}, "--lr_scheduler_type 'cosine' is not used by SC-Tune: each phase runs at a"),
    ({"lr_scheduler_kwargs": {"eta_min": 0}}, "--lr_scheduler_kwargs {'eta_min': 0} is not used by SC-Tune"),
    ({"warmup_steps": 1}, "--warmup_steps 1 is not used by SC-Tune: each phase starts at its full LR"),
])
def test_settings_that_cannot_train_as_asked_are_refused(tmp_path, fields, message):
    assert refusal(tmp_path, **fields).startswith(message)


def test_settings_at_the_edge_of_those_refusals_are_accepted(tmp_path):
    assert config(tmp_path, max_steps=1).max_steps == 1
    assert config(tmp_path, describer_update_steps=0, locator_update_steps=1).describer_update_steps == 0
    assert config(tmp_path, describer_update_steps=1, locator_update_steps=0).locator_update_steps == 0
    # a group baseline needs a group: two captions a box is the smallest
    for group in ({"describer_baseline": "group_mean"}, {"scale_rewards_by_group_std": True},
                  {"describer_baseline": "group_mean", "scale_rewards_by_group_std": True}):
        assert config(tmp_path, num_generations=2, **group).num_generations == 2
        assert refusal(tmp_path, num_generations=1, **group) == (
            "--describer_baseline group_mean and --scale_rewards_by_group_std need --num_generations >= 2")
    assert config(tmp_path, num_generations=1).describer_baseline == "snapshot_greedy"


def test_the_settings_sc_tune_owns_are_accepted_at_the_values_it_sets_and_then_set(tmp_path):
    """A config re-created from its own fields (``dataclasses.replace``) passes: the values SC-Tune sets itself are
    accepted; unset, they are set."""
    args = config(tmp_path, describer_lr=3e-6, learning_rate=3e-6, lr_scheduler_type="constant",
                  lr_scheduler_kwargs={}, warmup_steps=0)
    assert (args.learning_rate, args.lr_scheduler_type, args.lr_scheduler_kwargs, args.warmup_steps) == (
        3e-6, "constant", {}, 0)
    args = config(tmp_path, describer_lr=3e-6, lr_scheduler_kwargs="")
    assert (args.learning_rate, args.lr_scheduler_type, args.lr_scheduler_kwargs, args.warmup_steps) == (
        3e-6, "constant", {}, 0)


def test_decoding_switches_are_read_in_any_case_and_an_empty_compile_backend_is_none(tmp_path):
    args = config(tmp_path, static_decoding="TRUE", fused_decoding="False", decoding_compile_backend="None")
    assert (args.static_decoding, args.fused_decoding, args.decoding_compile_backend) == ("true", "false", None)
    for empty in ("", "none"):
        assert config(tmp_path, decoding_compile_backend=empty).decoding_compile_backend is None
    assert config(tmp_path, static_decoding="auto", decoding_compile_backend="eager").decoding_compile_backend == "eager"


@pytest.mark.parametrize(("micro", "accumulation", "generation", "accepted"), [
    (2, 4, None, 2),  # unset: one micro-batch per generate call, as the reference
    (2, 4, 8, 8),  # the whole window
    (2, 4, 4, 4),
    (2, 4, 6, None),  # does not divide the window of 8
    (2, 4, 3, None),  # not a multiple of the micro-batch
    (2, 4, 16, None),  # past the window
    (2, 4, 0, None),
    (1, 1, 1, 1),
])
def test_the_generation_batch_is_a_multiple_of_the_micro_batch_that_divides_the_window(
        tmp_path, micro, accumulation, generation, accepted):
    fields = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation,
              "generation_batch_size": generation}
    if accepted is None:
        assert refusal(tmp_path, **fields) == (
            f"--generation_batch_size {generation} must be a multiple of --per_device_train_batch_size ({micro}) that "
            f"divides per_device_train_batch_size x gradient_accumulation_steps ({micro * accumulation})")
    else:
        assert config(tmp_path, **fields).generation_batch_size == accepted


@pytest.mark.parametrize(("fields", "message"), [
    ({"lora_r": 0}, "--lora_r 0 must be >= 1"),
    ({"lora_alpha": 0}, "--lora_alpha 0 must be a finite number > 0"),
    ({"lora_alpha": math.inf}, "--lora_alpha inf must be a finite number > 0"),
    ({"lora_dropout": -1e-9}, r"--lora_dropout -1e-09 must be in [0, 1)"),
    ({"lora_dropout": 1.0}, r"--lora_dropout 1.0 must be in [0, 1)"),
    ({"lora_dropout": math.nan}, r"--lora_dropout nan must be in [0, 1)"),
])
def test_lora_settings_are_refused_past_their_bounds(fields, message):
    from sc_tune.arguments import LoraArguments

    with pytest.raises(ArgumentError) as error:
        LoraArguments(**fields)
    assert str(error.value) == f"invalid arguments: {message}"
    assert LoraArguments(lora_r=1, lora_alpha=1e-9, lora_dropout=0.0).lora_r == 1


@pytest.mark.parametrize(("low", "high", "message"), [
    (0, None, "--image_min_pixels 0 must be >= 1"),
    (None, 0, "--image_max_pixels 0 must be >= 1"),
    (9, 8, "--image_min_pixels 9 is above --image_max_pixels 8"),
])
def test_the_pixel_bounds_are_positive_and_in_order(low, high, message):
    from sc_tune.arguments import ModelArguments, check_image_pixels

    with pytest.raises(ArgumentError, match="^" + message.replace("(", r"\(")):
        ModelArguments(image_min_pixels=low, image_max_pixels=high)
    check_image_pixels(1, 1)
    check_image_pixels(None, 1)
    check_image_pixels(1, None)


# ---------------------------------------------------------------------------------------------- the same flags on every rank
@pytest.fixture
def parsed(tmp_path):
    from sc_tune.arguments import DataArguments, LoraArguments, ModelArguments

    return ModelArguments(), DataArguments(), LoraArguments(), config(tmp_path, max_steps=5)


def _gathered(monkeypatch, world_size=2, initialized=True, other=None):
    """torch.distributed as ``world_size`` processes see it; rank 1 on node-b contributes ``other(rank 0's flags)``."""
    import torch.distributed as dist

    def no_collective(*_):
        raise AssertionError("no collective where there is one process")

    monkeypatch.setattr(dist, "is_initialized", lambda: initialized)
    monkeypatch.setattr(dist, "get_world_size", (lambda: world_size) if initialized else no_collective)
    monkeypatch.setattr(dist, "all_gather_object", no_collective if other is None else (
        lambda out, mine: out.__setitem__(slice(None), [mine, ("node-b", other(dict(mine[1])))])))


def test_one_process_compares_nothing(monkeypatch, parsed):
    from sc_tune.arguments import check_same_flags_on_every_rank

    _gathered(monkeypatch, initialized=False)
    check_same_flags_on_every_rank(*parsed)
    _gathered(monkeypatch, world_size=1)
    check_same_flags_on_every_rank(*parsed)


@pytest.mark.parametrize("differing", [1, 5, 6, 8])
def test_the_refusal_names_the_first_five_flags_that_differ_and_counts_the_rest(monkeypatch, parsed, differing):
    from sc_tune.arguments import check_same_flags_on_every_rank

    names = ["adam_beta1", "clip_range", "gamma", "kl_coef", "lora_r", "ppo_epochs", "seed", "zzz_newer_flag"]

    def other(values):
        for name in names[:differing]:
            values[name] = "'other'"
        return values

    _gathered(monkeypatch, other=other)
    with pytest.raises(ArgumentError) as refused:
        check_same_flags_on_every_rank(*parsed)
    message = str(refused.value)
    shown = re.findall(r"--(\w+): ", message)
    assert shown == names[:min(differing, 5)]
    assert f"--adam_beta1: 0.9 on rank 0 on {socket.gethostname()}; 'other' on rank 1 on node-b" in message
    assert message.count(" more)") == (differing > 5) and (f"(and {differing - 5} more)" in message) == (differing > 5)


def test_a_flag_only_one_rank_has_is_named_as_unset_on_the_other(monkeypatch, parsed):
    from sc_tune.arguments import check_same_flags_on_every_rank

    _gathered(monkeypatch, other=lambda values: {**values, "aaa_newer_flag": "1"})
    with pytest.raises(ArgumentError, match=r"different settings: --aaa_newer_flag: unset on rank 0 on \S+; 1 on rank "
                                            r"1 on node-b\. Every node must run the same command"):
        check_same_flags_on_every_rank(*parsed)
    _gathered(monkeypatch, other=lambda values: {k: v for k, v in values.items() if k != "seed"})
    with pytest.raises(ArgumentError, match=r"different settings: --seed: 42 on rank 0 on \S+; unset on rank 1 on "
                                            r"node-b\. "):
        check_same_flags_on_every_rank(*parsed)


@dataclasses.dataclass
class Launch:
    """The fields of the training arguments the comparison reads otherwise (a real config naming a ZeRO-3 file would
    switch transformers' process-wide ZeRO-3 state on for the tests that follow)."""

    deepspeed: object = None
    resume_from_checkpoint: object = None
    seed: int = 42


def test_deepspeed_configs_are_compared_by_content_and_a_resume_by_its_checkpoints_name(tmp_path):
    from sc_tune.arguments import _node_independent

    written = tmp_path / "ds.json"
    written.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "bf16": {"enabled": True}}))
    reordered = {"bf16": {"enabled": True}, "zero_optimization": {"overlap_comm": True, "stage": 2}}
    stage3 = {**reordered, "zero_optimization": {"overlap_comm": True, "stage": 3}}
    as_file, as_dict, other_stage = (_node_independent([Launch(deepspeed=c)]) for c in (str(written), reordered, stage3))
    assert as_file["deepspeed"] == as_dict["deepspeed"] != other_stage["deepspeed"]
    assert as_file["seed"] == "42"
    here, there, plain = (_node_independent([Launch(resume_from_checkpoint=r)])["resume_from_checkpoint"]
                          for r in ("out/checkpoint-4/", "/mnt/run/out/checkpoint-4", True))
    assert here == there == "'checkpoint-4'" and plain == "True"
    assert _node_independent([Launch()])["deepspeed"] == "null"
