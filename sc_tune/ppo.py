"""The describer's PPO-style objective: the KL term, per-token rewards, advantages and the clipped loss.

Where this departs from textbook PPO (as the reference does):

- no value network and no GAE: the advantage is the caption's reward minus a baseline
  (:mod:`sc_tune.baselines`; the paper's is the IoU that the frozen snapshot obtains with its own greedy
  caption, located by itself);
- the KL penalty is in the reward, per token, as the plain log-ratio ``logp - snapshot_logp``; its
  coefficient comes from :mod:`sc_tune.kl_control` (fixed in the reference);
- the terminal reward ``reward - baseline`` sits at each sequence's own last token (the reference put it
  in the last padded column, which is only equivalent when ``gamma == 1``);
- no advantage whitening; the loss is a token-level mean over the whole micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def last_token_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """Index of each row's last unmasked token (masks are 1...1 0...0 per row)."""
    return (mask_BT.long().sum(dim=1) - 1).clamp(min=0)


def per_token_kl(logp_BT: torch.Tensor, snapshot_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """The KL penalty's per-token estimate ``log pi(a_t) - log pi_snapshot(a_t)`` on caption tokens, 0 elsewhere.

    The plain log-ratio (not a k2/k3 estimator), as the reference: summed over a sampled caption it is an
    unbiased estimate of KL(pi || pi_snapshot) for that prompt."""
    return (logp_BT - snapshot_logp_BT) * mask_BT.to(logp_BT.dtype)


def describer_advantages(
    terminal_B: torch.Tensor,
    kl_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
) -> torch.Tensor:
    """``A_t = sum_{t'>=t} gamma^(t'-t) r_t'`` with ``r_t = -kl_coef * kl_t`` plus ``terminal`` (the caption's
    reward minus its baseline) at the row's last token. For gamma = 1 this is
    ``R - R_b - kl_coef * sum_{t'>=t} kl_t'`` (docs/method.md §3)."""
    mask = mask_BT.to(kl_BT.dtype)
    rewards_BT = -kl_coef * kl_BT * mask
    terminal_BT = torch.zeros_like(rewards_BT)
    terminal_BT.scatter_(1, last_token_index(mask_BT)[:, None], terminal_B.to(kl_BT.dtype)[:, None])
    rewards_BT = rewards_BT + terminal_BT * mask
    advantages_BT = torch.zeros_like(rewards_BT)
    running_B = torch.zeros_like(terminal_B, dtype=kl_BT.dtype)
    for t in reversed(range(rewards_BT.shape[1])):
        running_B = rewards_BT[:, t] + gamma * running_B
        advantages_BT[:, t] = running_B
    return advantages_BT * mask


@dataclass
class PPOStats:
    clip_frac: torch.Tensor
    ratio: torch.Tensor
    policy_kl: torch.Tensor  # mean of old_logp - logp: how far the updates have moved the policy


def ppo_clip_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, PPOStats]:
    """Clipped surrogate ``mean_t max(-A ratio, -A clip(ratio, 1-eps, 1+eps))`` over unmasked tokens."""
    log_ratio_BT = logp_BT - old_logp_BT
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped_BT, clipped_BT), mask_BT)
    with torch.no_grad():
        stats = PPOStats(
            clip_frac=masked_mean((clipped_BT > unclipped_BT).to(logp_BT.dtype), mask_BT),
            ratio=masked_mean(ratio_BT, mask_BT),
            policy_kl=masked_mean(-log_ratio_BT, mask_BT),
        )
    return loss, stats
