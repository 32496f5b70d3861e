import pytest
import torch

from sc_tune.ppo import describer_advantages, last_token_index, masked_mean, per_token_kl, ppo_clip_loss


def test_masked_mean_ignores_masked_entries():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)


def test_masked_mean_of_one_token_is_that_token_and_of_none_is_zero():
    # a micro-batch whose captions hold a single token, and one whose rows are all masked (no NaN)
    values = torch.tensor([[5.0, 100.0], [100.0, 100.0]])
    assert masked_mean(values, torch.tensor([[1, 0], [0, 0]])).item() == pytest.approx(5.0)
    assert masked_mean(values, torch.zeros(2, 2)).item() == 0.0


def test_last_token_index():
    assert last_token_index(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])).tolist() == [1, 2, 0]


def test_advantages_match_hand_computation_gamma_one():
    reward_B = torch.tensor([0.8, 0.2])
    baseline_B = torch.tensor([0.5, 0.5])
    kl_BT = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = describer_advantages(reward_B - baseline_B, kl_BT, mask_BT, kl_coef=0.1, gamma=1.0)
    # row 0: R - R_b = 0.3; suffix KL sums 0.6, 0.5, 0.3 -> 0.3 - 0.1 * [0.6, 0.5, 0.3]
    # row 1: R - R_b = -0.3 at its own last token (t=1); the masked t=2 KL (9.0) must not leak in.
    expected = torch.tensor([[0.24, 0.25, 0.27], [-0.39, -0.35, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_per_token_kl_is_the_masked_log_ratio_policy_minus_snapshot():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    snapshot_logp = torch.tensor([[-1.5, -1.0, -9.0]])
    # policy - snapshot: 0.5, -1.0; the masked third token is 0 whatever its log-probs
    assert per_token_kl(logp, snapshot_logp, torch.tensor([[1, 1, 0]])).tolist() == [[0.5, -1.0, 0.0]]


def test_kl_penalty_lowers_the_advantage_of_tokens_the_policy_overweights():
    # terminal 0: only the KL term is left. kl = [0.5, -1.0] -> suffix sums [-0.5, -1.0] -> A = -0.2 * those.
    kl = per_token_kl(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), torch.ones(1, 2))
    adv = describer_advantages(torch.zeros(1), kl, torch.ones(1, 2), kl_coef=0.2)
    assert adv[0].tolist() == pytest.approx([0.1, 0.2])


def test_advantages_with_discount():
    adv = describer_advantages(torch.tensor([1.0]), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.long),
                               kl_coef=0.1, gamma=0.5)
    assert adv[0].tolist() == pytest.approx([0.25, 0.5, 1.0])


def test_clip_loss_equals_policy_gradient_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = ppo_clip_loss(logp, logp.detach(), adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-(1 + 1 - 2) / 3)
    loss.backward()
    # d loss / d logp = -A * ratio / n_tokens on unmasked tokens
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))
    assert stats.ratio.item() == pytest.approx(1.0) and stats.clip_frac.item() == 0.0


def test_clip_loss_clips_and_counts():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = ppo_clip_loss(logp, old, adv, torch.ones(1, 2), clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats.clip_frac.item() == pytest.approx(1.0)
    assert stats.ratio.item() == pytest.approx(1.0)
    assert stats.policy_kl.item() == pytest.approx(-(torch.log(torch.tensor(1.5)) + torch.log(torch.tensor(0.5))).item() / 2)
