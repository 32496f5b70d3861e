"""The KL coefficient: the adaptive controller's update by hand, and its state through a checkpoint."""

import json

import pytest

from sc_tune.arguments import SCTuneConfig
from sc_tune.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from tests.helpers import caption_hash_reward, make_trainer


def test_adaptive_update_hand_computed():
    c = AdaptiveKLController(0.1, target=2.0, horizon=100)
    c.update(observed_kl=2.2, num_captions=10)  # error 2.2/2 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 10/100) = 0.101
    assert c.value == pytest.approx(0.101)
    c.update(observed_kl=8.0, num_captions=50)  # error 3 clipped to 0.2 -> 0.101 * (1 + 0.2 * 0.5) = 0.1111
    assert c.value == pytest.approx(0.1111)
    c.update(observed_kl=0.0, num_captions=100)  # error -1 clipped to -0.2 -> 0.1111 * 0.8 = 0.08888
    assert c.value == pytest.approx(0.08888)
    with pytest.raises(ValueError, match="at least the captions of one rollout"):
        c.update(observed_kl=1.0, num_captions=101)


@pytest.mark.parametrize("target,horizon", [(0.0, 100), (-1.0, 100), (2.0, 0), (2.0, -5)])
def test_adaptive_control_refuses_a_target_or_horizon_that_is_not_positive(target, horizon):
    with pytest.raises(ValueError, match="needs kl_target > 0 and kl_horizon > 0"):
        AdaptiveKLController(0.1, target=target, horizon=horizon)
    AdaptiveKLController(0.1, target=1e-3, horizon=1)  # the smallest settings that make sense are taken


def test_fixed_never_moves_and_states_round_trip():
    fixed = FixedKLController(0.01)
    fixed.update(100.0, 10)
    assert fixed.value == 0.01
    adaptive = AdaptiveKLController(0.5, 1.0, 10)
    adaptive.update(0.0, 5)
    restored = AdaptiveKLController(0.5, 1.0, 10)
    restored.load_state_dict(json.loads(json.dumps(adaptive.state_dict())))
    assert restored.value == adaptive.value == pytest.approx(0.45)
    with pytest.raises(ValueError, match="'adaptive' KL controller, this run a 'fixed'"):
        fixed.load_state_dict(adaptive.state_dict())


def test_flags(tmp_path):
    args = SCTuneConfig(output_dir=str(tmp_path), kl_controller="adaptive", kl_coef=0.2, kl_target=1.5,
                        kl_horizon=50, use_cpu=True)
    c = make_kl_controller(args)
    assert isinstance(c, AdaptiveKLController) and (c.value, c.target, c.horizon) == (0.2, 1.5, 50)
    with pytest.raises(ValueError, match="--kl_controller must be one of fixed, adaptive"):
        SCTuneConfig(output_dir=str(tmp_path), kl_controller="pid", use_cpu=True)


def test_trainer_logs_updates_and_checkpoints_the_coefficient(tiny_checkpoint, tmp_path):
    # 3 describer rollouts (steps 0-1, 2-3, 4-5; the snapshot synced at 0); checkpoint-3 is taken before step 3.
    common = dict(max_steps=6, describer_update_steps=3, locator_update_steps=1, ppo_epochs=2, kl_controller="adaptive",
                  kl_coef=0.5, kl_target=1e-3, kl_horizon=8)
    full = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path / "full"), reward_fn=caption_hash_reward,
                        save_strategy="steps", save_steps=3, **common)
    full.train()
    coefs = [h["describer/kl_coef"] for h in full.state.log_history if "describer/kl_coef" in h]
    # Rollout 0: KL 0 (policy == snapshot): error -0.2 on 4 captions -> 0.5 * (1 - 0.2 * 4/8) = 0.45, used from
    # rollout 1 on. Rollout 1 measures KL > 1e-3 (the policy moved): error +0.2 -> 0.45 * 1.1 = 0.495.
    assert coefs[:4] == pytest.approx([0.5, 0.5, 0.45, 0.45])
    assert coefs[4] == pytest.approx(0.495)
    saved = json.loads((tmp_path / "full" / "checkpoint-3" / "sc_tune_state.json").read_text())
    assert saved["kl_controller"] == {"kind": "adaptive", "value": pytest.approx(0.495)}

    # Resumed at step 3 (rollout 1's buffered second epoch), rollout 2 (steps 4-5) must use the restored 0.495,
    # not a fresh 0.5: the same coefficients and losses as the uninterrupted run.
    resumed = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path / "resumed"), reward_fn=caption_hash_reward,
                           **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    after = lambda t: [h for h in t.state.log_history if "loss" in h and h["step"] > 3]  # noqa: E731
    assert [h["describer/kl_coef"] for h in after(resumed) if "describer/kl_coef" in h] == pytest.approx(
        [0.45, 0.495, 0.495]
    )
    assert [h["loss"] for h in after(resumed)] == pytest.approx([h["loss"] for h in after(full)], rel=1e-5, abs=1e-7)
