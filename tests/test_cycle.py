"""What the rollout stages hand the losses, seen through the trainer's ``cycle=`` seam (``RecordingCycle``).

- The locator learns pseudo-labels: the SNAPSHOT's GREEDY caption paired with the TRUE box. Checked on the committed
  warm start, whose locator writes boxes that parse, on objects it grounds on the wrong shape (so a located box is
  never the true one), with the policy perturbed mid-phase (so its captions are not the snapshot's) and a sampling
  temperature of 2 (so a sampled caption is not the greedy one).
- With K = 2 samples per box, each sample's reward is scored against its own box (a reward that depends on the box),
  and the snapshot's baseline caption of each box is its greedy one.
- The log-probabilities of the KL term and of the PPO ratio are those of the distribution the captions were sampled
  from: at ``--describer_temperature 2``, log_softmax(logits / 2), computed here by hand.
"""

import zlib

import pytest
import torch
from transformers import TrainerCallback

from sc_tune.arguments import ArgumentError, SCTuneConfig
from sc_tune.boxes import box_iou
from sc_tune.data import ReferringDataset
from sc_tune.modeling import load_model_and_adapter
from sc_tune.rewards import RewardBatch
from sc_tune.rollout import GenerationSettings, describe, describer_budget
from tests.conftest import WARM_START
from tests.helpers import (RecordingCycle, ScriptedLogits, make_trainer, small_lora, trainable_vector,
                           two_phase_trainer)


# ---------------------------------------------------------------- the locator's pseudo-labels
class PerturbPolicyAt(TrainerCallback):
    """Before step ``step``, noise on the policy's trainable language-model weights: from then on the policy writes
    other captions than the snapshot (which keeps the phase's start weights)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.step:
            return
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad and "language_model" in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def test_the_locator_learns_the_snapshots_greedy_caption_paired_with_the_true_box(mislocated, tmp_path):
    root, records = mislocated
    trainer = make_trainer(
        WARM_START, str(tmp_path), dataset=ReferringDataset(records[:8], str(root)), cycle=RecordingCycle,
        describer_update_steps=0, locator_update_steps=2, max_steps=2, per_device_train_batch_size=8,
        describer_max_new_tokens=8, describer_min_new_tokens=1, locator_max_new_tokens=32, locator_min_new_tokens=3,
        describer_top_k=0, describer_top_p=1.0, describer_temperature=2.0, locator_lr=3e-5,
    )  # fmt: skip
    trainer.add_callback(PerturbPolicyAt(1))
    trainer.train()
    snapshot, adapter = load_model_and_adapter(WARM_START)  # the phase's start weights: the snapshot's
    snapshot.eval()
    greedy = GenerationSettings(describer_budget(adapter, 8), 1)  # 8 caption tokens + the answer form's end
    assert len(trainer.cycle.made) == 2
    for step, (inputs, result) in enumerate(trainer.cycle.made):
        images = [adapter.prepare_image(image) for image in inputs["images"]]
        boxes = inputs["boxes"].tolist()
        captions = describe(snapshot, adapter, images, boxes, greedy)[1].texts
        expected = adapter.build_batch([adapter.locator_prompt(c, im) for c, im in zip(captions, images)], images,
                                       [adapter.locator_target(box, im, c) for box, im, c in zip(boxes, images, captions)])
        assert torch.equal(result.rollout.inputs["input_ids"], expected.inputs["input_ids"]), step
        assert torch.equal(result.rollout.labels, expected.labels), step
    # The test can tell: at step 1 the policy's captions are not the snapshot's (it learned nothing from them).
    trainer.model.eval()
    policy_captions = describe(trainer.model, adapter, images, boxes, greedy)[1].texts
    assert sum(p != c for p, c in zip(policy_captions, captions)) >= 4, (policy_captions, captions)


# ---------------------------------------------------------------- K = 2: rewards against the right boxes, greedy baseline
class BoxReward:
    """A reward that depends on the box: each caption's reward is the x1 of the true box it is scored against."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, list[str]]] = []

    def __call__(self, pred_boxes, target_N4, captions):
        self.calls.append((target_N4.clone(), list(captions)))
        return RewardBatch(target_N4[:, 0].float().clone(), torch.tensor([b is not None for b in pred_boxes]))


@pytest.fixture(scope="module", params=[2, 1], ids=["k2", "k1"])
def two_samples_per_box(tiny_checkpoint, tmp_path_factory, request):
    """One describer rollout of 2 boxes x K = 2 samples (and K = 1, where the snapshot's greedy captions decode
    through ``generate_captions``, from the scoring pass's prompts) on a tiny random Qwen2-VL, the paper's baseline."""
    reward = BoxReward()
    k = request.param
    trainer = make_trainer(
        tiny_checkpoint("qwen2_vl"), str(tmp_path_factory.mktemp(f"k{k}")), reward_fn=reward, cycle=RecordingCycle,
        num_generations=k, per_device_train_batch_size=2, max_steps=1, describer_update_steps=1,
        locator_update_steps=0, ppo_epochs=1, describer_top_k=0, describer_top_p=1.0,
    )  # fmt: skip
    trainer.train()
    return trainer, reward


def test_with_k_samples_each_reward_is_scored_against_its_own_box(two_samples_per_box):
    trainer, reward = two_samples_per_box
    (inputs, result), = trainer.cycle.made
    boxes_B4 = inputs["boxes"]
    k = trainer.args.num_generations
    assert boxes_B4[0, 0] != boxes_B4[1, 0]  # the test can tell the boxes apart
    # Samples of a box are adjacent: with K = 2, rows 0, 1 are box 0's, rows 2, 3 box 1's.
    assert torch.equal(reward.calls[0][0], boxes_B4.repeat_interleave(k, dim=0))
    assert torch.equal(result.rollout.reward_N, boxes_B4[:, 0].repeat_interleave(k).float())
    assert torch.equal(result.rollout.baseline_N, boxes_B4[:, 0].repeat_interleave(k).float())  # greedy: own box
    # ...so no caption's reward differs from its baseline, and the log says so.
    assert [entry["describer/nonzero_advantage"] for entry in trainer.state.log_history
            if "describer/nonzero_advantage" in entry] == [0.0]


def test_with_k_samples_the_baseline_caption_is_the_snapshots_greedy_one(two_samples_per_box, tiny_checkpoint):
    trainer, reward = two_samples_per_box
    (inputs, _), = trainer.cycle.made
    snapshot, adapter = load_model_and_adapter(tiny_checkpoint("qwen2_vl"))  # step 0: the snapshot is the start
    snapshot.eval()
    images = [adapter.prepare_image(image) for image in inputs["images"]]
    greedy_captions = describe(snapshot, adapter, images, inputs["boxes"].tolist(),
                               GenerationSettings(describer_budget(adapter, 6), 2))[1].texts
    targets, captions = reward.calls[1]  # the baseline's call: one greedy caption per box, against its box
    assert captions == greedy_captions and torch.equal(targets, inputs["boxes"])
    k = trainer.args.num_generations
    sampled = reward.calls[0][1]
    assert any(sampled[i::k] != greedy_captions for i in range(k))  # samples differ: the test can tell
    # K = 1: the captions decoded through generate_captions, from the scoring pass's cache (K = 2: a describe call)
    assert trainer.cycle.handed_cache == ([True] if k == 1 else [])


class _EndedGreedyCaptionsCycle(RecordingCycle):
    """The snapshot's greedy captions (K = 1: ``generate_captions``) written as "a cat" and the end token."""

    def generate_captions(self, model, batch, settings, prompt_cache=None):
        script = self.adapter.encode_target("a cat" + self.adapter.end_text)
        assert settings.min_new_tokens < len(script) <= settings.max_new_tokens  # the caption ends on its own
        with ScriptedLogits(model) as forcing:
            forcing.write([script] * len(batch.inputs["input_ids"]))
            return super().generate_captions(model, batch, settings, prompt_cache)


def test_the_greedy_baselines_captions_reach_the_locator_without_their_end_token(tiny_checkpoint, tmp_path):
    # A caption is its text: the end token (Qwen2-VL's <|im_end|>) is the answer form's, and read into the locator
    # prompt it would be a turn's end in the middle of the user's turn.
    reward = BoxReward()
    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path), reward_fn=reward,
                           cycle=_EndedGreedyCaptionsCycle, per_device_train_batch_size=2, max_steps=1,
                           describer_update_steps=1, locator_update_steps=0, ppo_epochs=1)
    trainer.train()
    assert trainer.cycle.handed_cache == [True]
    targets, captions = reward.calls[1]  # the baseline's call: one greedy caption per box
    assert captions == ["a cat", "a cat"]


# ---------------------------------------------------------------- log-probabilities at the sampling temperature
def test_log_probabilities_are_those_of_the_sampling_temperature(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path), cycle=RecordingCycle, describer_temperature=2.0,
                           max_steps=1, describer_update_steps=1, locator_update_steps=0, ppo_epochs=1,
                           reward_fn=BoxReward())
    trainer.train()
    rollout = trainer.cycle.made[0][1].rollout
    model, _ = load_model_and_adapter(tiny_checkpoint("qwen2_vl"))  # the snapshot's and the pre-update policy's weights
    model.eval()
    with torch.no_grad():
        logits = model(**rollout.inputs).logits.float()
    ids_NT, mask_NT = rollout.caption_ids_NT, rollout.caption_mask_NT.bool()
    width, length = logits.shape[1], ids_NT.shape[1]
    by_hand = {}
    for temperature in (2.0, 1.0):
        logp = torch.zeros(ids_NT.shape)
        for n in range(ids_NT.shape[0]):
            for t in range(length):  # caption token t sits at column width - length + t, predicted one column before
                row = logits[n, width - length + t - 1] / temperature
                logp[n, t] = row[ids_NT[n, t]] - torch.logsumexp(row, dim=0)
        by_hand[temperature] = logp
    for computed in (rollout.snapshot_logp_NT, rollout.old_logp_NT):  # the KL reference, the PPO ratio's old policy
        assert torch.allclose(computed[mask_NT], by_hand[2.0][mask_NT], atol=1e-4)
        assert not torch.allclose(computed[mask_NT], by_hand[1.0][mask_NT], atol=1e-2)  # the temperature matters


# ---------------------------------------------------------------- a generation batch over the accumulation window
def caption_box(caption: str) -> list[float]:
    """A box made from a caption's text: where ``CaptionBoxCycle`` locates it."""
    corner = zlib.crc32(caption.encode()) % 500 / 1000
    return [corner, corner, corner + 0.5, corner + 0.5]


class CaptionBoxCycle(RecordingCycle):
    """Locates each caption (fresh or from the image prefix, after the real call) at ``caption_box`` of its text: the
    tiny models write no box that parses, so without this every located box is None and a reward could not tell
    which caption's located row it was handed."""

    def locate(self, model, images, captions):
        _, texts = super().locate(model, images, captions)
        return [caption_box(c) for c in captions], texts

    def locate_from_prefix(self, model, images, captions, scored, source_rows):
        found = super().locate_from_prefix(model, images, captions, scored, source_rows)
        return None if found is None else ([caption_box(c) for c in captions], found[1])


def box_and_caption_reward(pred_boxes, target_N4, captions):
    """Depends on the caption, on the box it is scored against, and on the box located for it: a caption paired with
    another box, another micro-batch's caption, or another row's located box changes the reward."""
    text = torch.tensor([zlib.crc32(c.encode()) % 1000 / 1000 for c in captions], dtype=torch.float32)
    located = torch.tensor([b if b is not None else [0.0] * 4 for b in pred_boxes], dtype=torch.float32)
    iou = box_iou(located.reshape(-1, 4), target_N4.float())
    return RewardBatch(text + target_N4[:, 0].float() + iou, torch.tensor([b is not None for b in pred_boxes]))


@pytest.mark.parametrize("family, settings", [
    ("qwen2_vl", {}),  # CPU defaults: transformers' generate alone, the decoding loop's noise blocks together
    # one fused loop of LoRA rows; the vision cache off: Qwen-VL's tower encodes a chunk's images in one batch, whose
    # features differ from a micro-batch's in the last bits (1e-6), and the loss would reuse them
    ("qwen", {"static_decoding": "true", "fused_decoding": "true", "model_transform": small_lora,
              "vision_cache": False}),
    ("qwen2_vl", {"describer_baseline": "group_mean"}),  # no greedy captions: a micro-batch's rows are its samples
])  # fmt: skip
def test_a_generation_batch_of_the_window_gives_the_losses_of_rollouts_per_micro_batch(tiny_checkpoint, tmp_path,
                                                                                      family, settings):
    """Micro-batches of 2 boxes, K = 2, two per step: rolling out the step's 4 boxes in one chunk
    (--generation_batch_size 4) samples, scores and rewards what rolling out each micro-batch alone does: the same
    captions, equal losses at every step (a describer rollout with two PPO epochs, a locator step, a describer
    rollout) and equal weights after, in half the generate calls."""
    runs = {}
    for generation_batch in (2, 4):
        trainer, losses = two_phase_trainer(
            tiny_checkpoint(family), str(tmp_path / str(generation_batch)), cycle=CaptionBoxCycle,
            per_device_train_batch_size=2, gradient_accumulation_steps=2, num_generations=2,
            generation_batch_size=generation_batch, reward_fn=box_and_caption_reward, **settings,
        )  # fmt: skip
        trainer.train()
        captions = [result.rollout.caption_ids_NT for _, result in trainer.cycle.made if result.captions]
        runs[generation_batch] = (losses, trainer.cycle.decode_calls, trainable_vector(trainer.model), captions)
    alone, together = runs[2], runs[4]
    assert len(alone[3]) == len(together[3]) == 4  # two describer rollouts of two micro-batches
    assert all(torch.equal(a, b) for a, b in zip(alone[3], together[3]))
    assert not torch.equal(alone[3][0], alone[3][1])  # the micro-batches sample apart (their own seeds)
    assert len(alone[0]) == 2 * 4 and alone[0] == together[0]
    assert torch.equal(alone[2], together[2])
    fused = settings.get("fused_decoding") == "true"
    greedy = settings.get("describer_baseline") != "group_mean"
    # per describer micro-batch: samples (+ greedy captions, fused), the snapshot's greedy captions (for its
    # baseline), locating; per locator micro-batch: the snapshot's greedy captions
    describer_alone = [6, 6] if fused else [4, 2, 6] if greedy else [4, 4]
    describer_together = [12, 12] if fused else [8, 4, 12] if greedy else [8, 8]
    assert alone[1] == describer_alone * 2 + [2, 2] + describer_alone * 2
    assert together[1] == describer_together + [4] + describer_together


def test_a_generation_batch_refuses_a_micro_batch_the_trainers_loop_did_not_fetch(tiny_checkpoint, tmp_path):
    """A chunk spanning micro-batches takes the next ones from the step's window (``get_batch_samples``); a micro-batch
    that is not in it (a Trainer loop that fetched no window, or another batch) is refused, never rolled out with
    batches of another step."""
    from sc_tune.data import collate_referring
    from sc_tune.phases import Phase

    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path), per_device_train_batch_size=1,
                           gradient_accumulation_steps=2, generation_batch_size=2)  # fmt: skip
    batch = collate_referring([trainer.train_dataset[0]])
    for window in (None, [dict(batch), dict(batch)]):
        trainer._window, trainer._micro = window, 0
        with pytest.raises(RuntimeError, match="--generation_batch_size spans micro-batches: .* not among them"):
            trainer._roll_out(Phase.DESCRIBER, batch)
    assert trainer.run.rollouts == {}


def test_a_generation_batch_must_tile_the_accumulation_window(tmp_path):
    for generation_batch in (3, 12, 0):
        with pytest.raises(ArgumentError, match="--generation_batch_size"):
            SCTuneConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                         generation_batch_size=generation_batch, max_steps=1, use_cpu=True)
    assert SCTuneConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                        max_steps=1, use_cpu=True).generation_batch_size == 2
