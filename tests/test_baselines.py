"""Every --describer_baseline and the group-std scaling against hand-computed advantages."""

import pytest
import torch

from sc_tune.arguments import SCTuneConfig
from sc_tune.baselines import STD_EPS, DescriberBaseline, describer_baseline, terminal_advantages

# 2 boxes x K=3 sampled captions, each box's samples adjacent
REWARD_N = torch.tensor([0.9, 0.3, 0.0, 0.5, 0.5, 0.2])
GREEDY_B = torch.tensor([0.6, 0.1])


@pytest.mark.parametrize("kind", ["snapshot_greedy", "policy_greedy"])
def test_greedy_baselines_repeat_the_greedy_reward_over_the_box_samples(kind):
    baseline = describer_baseline(DescriberBaseline(kind), REWARD_N, 3, GREEDY_B)
    assert baseline.tolist() == pytest.approx([0.6, 0.6, 0.6, 0.1, 0.1, 0.1])
    # reward - baseline: 0.9-0.6, 0.3-0.6, 0-0.6 | 0.5-0.1, 0.5-0.1, 0.2-0.1
    assert terminal_advantages(REWARD_N, baseline, 3).tolist() == pytest.approx([0.3, -0.3, -0.6, 0.4, 0.4, 0.1])
    with pytest.raises(ValueError, match="greedy caption's reward"):
        describer_baseline(DescriberBaseline(kind), REWARD_N, 3)


def test_group_mean_is_the_mean_of_the_other_samples():
    baseline = describer_baseline(DescriberBaseline.GROUP_MEAN, REWARD_N, 3)
    # box 0: (0.3+0)/2, (0.9+0)/2, (0.9+0.3)/2; box 1: (0.5+0.2)/2, (0.5+0.2)/2, (0.5+0.5)/2
    assert baseline.tolist() == pytest.approx([0.15, 0.45, 0.6, 0.35, 0.35, 0.5])
    assert terminal_advantages(REWARD_N, baseline, 3).tolist() == pytest.approx([0.75, -0.15, -0.6, 0.15, 0.15, -0.3])
    with pytest.raises(ValueError, match="at least 2 samples"):
        describer_baseline(DescriberBaseline.GROUP_MEAN, REWARD_N, 1)
    # the smallest group allowed: each of a pair's samples is measured against the other
    assert describer_baseline(DescriberBaseline.GROUP_MEAN, REWARD_N, 2).tolist() == pytest.approx(
        [0.3, 0.9, 0.5, 0.0, 0.2, 0.5])


def test_none_is_the_raw_reward():
    baseline = describer_baseline(DescriberBaseline.NONE, REWARD_N, 3)
    assert baseline.tolist() == [0.0] * 6
    assert terminal_advantages(REWARD_N, baseline, 3).tolist() == pytest.approx(REWARD_N.tolist())


def test_scaling_by_the_group_std():
    baseline = describer_baseline(DescriberBaseline.GROUP_MEAN, REWARD_N, 3)
    # box 0 rewards 0.9, 0.3, 0: mean 0.4, unbiased var (0.25+0.01+0.16)/2 = 0.21; box 1: 0.5, 0.5, 0.2:
    # mean 0.4, var (0.01+0.01+0.04)/2 = 0.03
    std0, std1 = 0.21**0.5, 0.03**0.5
    expected = [0.75 / (std0 + STD_EPS), -0.15 / (std0 + STD_EPS), -0.6 / (std0 + STD_EPS),
                0.15 / (std1 + STD_EPS), 0.15 / (std1 + STD_EPS), -0.3 / (std1 + STD_EPS)]
    assert terminal_advantages(REWARD_N, baseline, 3, scale_by_group_std=True).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        terminal_advantages(REWARD_N, baseline, 1, scale_by_group_std=True)
    # pairs: each pair's unbiased std is |r1 - r2| / sqrt(2)
    pair_std = [abs(0.9 - 0.3) / 2**0.5, abs(0.0 - 0.5) / 2**0.5, abs(0.5 - 0.2) / 2**0.5]
    scaled = terminal_advantages(REWARD_N, torch.zeros(6), 2, scale_by_group_std=True)
    assert scaled.tolist() == pytest.approx([r / (pair_std[i // 2] + STD_EPS) for i, r in enumerate(REWARD_N.tolist())])


def test_baseline_flags_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--describer_baseline must be one of"):
        SCTuneConfig(output_dir=str(tmp_path), describer_baseline="mean", use_cpu=True)
    with pytest.raises(ValueError, match="need --num_generations >= 2"):
        SCTuneConfig(output_dir=str(tmp_path), describer_baseline="group_mean", use_cpu=True)
    with pytest.raises(ValueError, match="need --num_generations >= 2"):
        SCTuneConfig(output_dir=str(tmp_path), scale_rewards_by_group_std=True, use_cpu=True)


def test_benchmark_baselines_sample_the_same_number_of_captions():
    from sc_tune.synthetic.pipeline import BASELINES, VARIANTS, sampled_captions

    # 750 steps = 6 cycles of (50 rollouts x 2 PPO epochs + 25 locator steps): 300 rollouts x 32 captions, where
    # group_mean draws its 32 as 8 boxes x 4 samples.
    assert {v: sampled_captions(750, VARIANTS[v]) for v in BASELINES} == dict.fromkeys(BASELINES, 9600)
    assert VARIANTS["group_mean"]["num_generations"] == 4
