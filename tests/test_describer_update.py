"""The describer update moves the policy the way its reward says, on the committed warm start.

The warm start (checkpoints/warm_start, a tiny Qwen3-VL trained on the synthetic shapes) captions most
objects tersely ("the circle") and locates well. The tests train the describer only (no locator phase),
with weight_decay 0, and measure the mean log-probability of the full caption ("the red circle") and the
terse one of each object before and after a few steps:

- with the paper's IoU reward and snapshot-greedy baseline, on objects whose terse caption the locator
  grounds on the *wrong* shape (baseline 0) while the full caption finds the right one (reward 1): the
  full caption must gain. Swapping the sampled and the baseline rewards, flipping the advantage's sign or
  the loss's, turns this into a loss;
- with every --describer_baseline, a reward that pays 1 for full captions raises their log-probability.

And one white-box check of the wiring on a tiny random model: the advantages are exactly
``reward - baseline - kl_coef * (suffix sum of log pi - log pi_snapshot)``, with a non-zero KL term.
"""

import pytest
import torch
from PIL import Image

from sc_tune.data import ReferringDataset
from tests.conftest import WARM_START
from tests.helpers import CaptionReward, RecordingCycle, caption_hash_reward, make_trainer

SHAPES = dict(
    describer_max_new_tokens=8,
    describer_min_new_tokens=1,
    describer_top_k=0,  # sample from the full distribution: the warm start writes a full caption ~1 time in 4
    describer_top_p=1.0,
    locator_max_new_tokens=32,
    locator_min_new_tokens=3,
    locator_update_steps=0,  # describer only: the locator stays the warm start's
    ppo_epochs=2,
)


def caption_logprob(model, adapter, root, records, key: str) -> float:
    """Mean over objects of log p(caption + end token | describer prompt)."""
    images = [adapter.prepare_image(Image.open(root / r["image"]).convert("RGB")) for r in records]
    prompts = [adapter.describer_prompt(r["bbox"], im) for r, im in zip(records, images)]
    batch = adapter.build_batch(prompts, images, [adapter.describer_target(r[key]) for r in records])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**batch.inputs).logits[:, :-1].float()
    model.train(was_training)
    labels = batch.labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return float((logp * (labels != -100)).sum(1).mean())


def train_describer(root, records, out, reward_fn=None, **overrides):
    settings = {**SHAPES, **overrides}
    trainer = make_trainer(WARM_START, str(out), reward_fn=reward_fn, dataset=ReferringDataset(records, str(root)),
                           cycle=RecordingCycle, **settings)
    before = {k: caption_logprob(trainer.model, trainer.adapter, root, records, k) for k in ("caption", "terse")}
    trainer.train()
    after = {k: caption_logprob(trainer.model, trainer.adapter, root, records, k) for k in ("caption", "terse")}
    return trainer, before, after


def test_iou_reward_teaches_the_colour_where_the_terse_caption_is_mislocated(mislocated, tmp_path):
    root, records = mislocated
    trainer, before, after = train_describer(root, records, tmp_path, per_device_train_batch_size=8,
                                             describer_update_steps=3, max_steps=6, describer_lr=3e-4)
    first = next(h for h in trainer.state.log_history if "describer/reward" in h)
    # The greedy caption is terse and mislocated on every picked object: the baseline is 0, the reward is not.
    assert first["describer/greedy_reward"] == 0.0 and first["describer/baseline"] == 0.0
    assert first["describer/reward"] > 0.0
    assert after["caption"] - before["caption"] > 0.2, (before, after)
    assert after["terse"] < before["terse"], (before, after)


def _is_full(caption: str) -> bool:
    return len(caption.split()) == 3  # "the <colour> <kind>"


@pytest.mark.parametrize(
    "baseline,generations,boxes",
    [("snapshot_greedy", 1, 8), ("policy_greedy", 1, 8), ("group_mean", 4, 2), ("none", 1, 8)],
)
def test_every_baseline_raises_the_rewarded_caption(baseline, generations, boxes, mislocated, tmp_path):
    root, records = mislocated
    reward = CaptionReward(_is_full)
    trainer, before, after = train_describer(
        root, records, tmp_path, reward, describer_baseline=baseline, num_generations=generations,
        per_device_train_batch_size=boxes, describer_update_steps=2, max_steps=4, describer_lr=3e-4,
    )
    assert after["caption"] - before["caption"] > 0.1, (before, after)
    # 8 sampled captions per rollout (boxes x K), and the greedy one per box if the baseline needs it, all
    # located in ONE batched call per rollout.
    greedy = boxes if baseline.endswith("greedy") else 0
    assert trainer.cycle.located_rows == [8 + greedy, 8 + greedy]
    assert len(reward.scored) == 2 * (8 + greedy)


def test_advantages_are_reward_minus_baseline_minus_the_kl_suffix(tiny_checkpoint, tmp_path):
    scored = []

    def recording_reward(pred_boxes, target_N4, captions):
        result = caption_hash_reward(pred_boxes, target_N4, captions)
        scored.append(result.reward_N)
        return result

    # Two rollouts in one describer phase: the second one's policy has moved away from the snapshot.
    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path), reward_fn=recording_reward, max_steps=2,
                           describer_update_steps=2, locator_update_steps=0, ppo_epochs=1, kl_coef=0.5,
                           cycle=RecordingCycle)
    trainer.train()
    rollout = trainer.cycle.made[1][1].rollout  # the loss filled in its advantages
    sampled_reward, greedy_reward = scored[2], scored[3]  # each rollout scores its samples, then the greedy captions
    assert torch.equal(rollout.reward_N.cpu(), sampled_reward)
    assert torch.equal(rollout.baseline_N.cpu(), greedy_reward)
    mask = rollout.caption_mask_NT.float()
    kl = (rollout.old_logp_NT - rollout.snapshot_logp_NT) * mask
    assert kl.abs().sum() > 1e-3, "the second rollout's policy should differ from the snapshot"
    kl_suffix = kl.flip(1).cumsum(1).flip(1)
    expected = ((sampled_reward - greedy_reward)[:, None] - 0.5 * kl_suffix) * mask
    assert rollout.kl_coef == 0.5
    assert torch.allclose(rollout.advantages_NT, expected, atol=1e-6)
    assert not torch.allclose(rollout.advantages_NT, (sampled_reward - greedy_reward)[:, None] * mask, atol=1e-4)
