"""The describer's baseline: what each sampled caption's reward is compared with.

``--describer_baseline`` (``--num_generations K`` sampled captions per box; N = boxes x K rows, each box's
K samples adjacent):

- ``snapshot_greedy`` (the paper's): the reward of the frozen snapshot's greedy caption, located by the
  snapshot. At the start of each describer phase the snapshot *is* the policy;
- ``policy_greedy`` (ReMax, SCST): the reward of the current policy's greedy caption, located by the snapshot;
- ``group_mean`` (RLOO): the mean reward of the box's other K - 1 samples (needs K >= 2), so a sample is
  never compared with itself and the baseline stays unbiased;
- ``none``: no baseline, the raw reward (REINFORCE).

``--scale_rewards_by_group_std`` divides each reward-minus-baseline by the standard deviation of its box's
K sampled rewards (GRPO's scaling; needs K >= 2). The KL penalty is added afterwards, unscaled.
"""

from __future__ import annotations

from enum import Enum

import torch

# GRPO's guard: a group whose K rewards are all equal has std 0.
STD_EPS = 1e-4


class DescriberBaseline(str, Enum):
    SNAPSHOT_GREEDY = "snapshot_greedy"
    POLICY_GREEDY = "policy_greedy"
    GROUP_MEAN = "group_mean"
    NONE = "none"

    @property
    def needs_greedy_caption(self) -> bool:
        return self in (DescriberBaseline.SNAPSHOT_GREEDY, DescriberBaseline.POLICY_GREEDY)


def leave_one_out_mean(reward_N: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each sample's baseline: the mean reward of the other ``group_size - 1`` samples of its box."""
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per box (--num_generations >= 2)")
    reward_BK = reward_N.reshape(-1, group_size)
    return ((reward_BK.sum(dim=1, keepdim=True) - reward_BK) / (group_size - 1)).reshape(-1)


def describer_baseline(
    kind: DescriberBaseline, reward_N: torch.Tensor, group_size: int, greedy_reward_B: torch.Tensor | None = None
) -> torch.Tensor:
    """The baseline of every sampled caption, shape ``(N,)`` like ``reward_N``."""
    kind = DescriberBaseline(kind)
    if kind.needs_greedy_caption:
        if greedy_reward_B is None:
            raise ValueError(f"the {kind.value} baseline needs the greedy caption's reward")
        return greedy_reward_B.to(reward_N.dtype).repeat_interleave(group_size)
    if kind is DescriberBaseline.GROUP_MEAN:
        return leave_one_out_mean(reward_N, group_size)
    return torch.zeros_like(reward_N)


def terminal_advantages(
    reward_N: torch.Tensor, baseline_N: torch.Tensor, group_size: int, scale_by_group_std: bool = False
) -> torch.Tensor:
    """``reward - baseline`` per sampled caption, optionally divided by its box's reward std (unbiased)."""
    advantage_N = reward_N - baseline_N
    if not scale_by_group_std:
        return advantage_N
    if group_size < 2:
        raise ValueError("--scale_rewards_by_group_std needs --num_generations >= 2")
    std_B = reward_N.reshape(-1, group_size).std(dim=1)
    return advantage_N / (std_B.repeat_interleave(group_size) + STD_EPS)
