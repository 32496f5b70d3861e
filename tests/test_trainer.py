"""A few real steps of both phases on a tiny random Qwen2-VL, with assertions on what each step did."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from sc_tune.cycle import LocatorRollout
from sc_tune.phases import innermost_optimizer
from tests.helpers import RecordingCycle, caption_hash_reward, make_trainer, trainable_vector


def _snapshot_vector(trainer):
    policy = dict(trainer.model.named_parameters())
    return torch.cat(
        [p.detach().flatten().clone() for n, p in trainer.snapshot.module.named_parameters() if policy[n].requires_grad]
    )


def _moments(trainer):
    state = innermost_optimizer(trainer.optimizer).state
    return sum(float(v.abs().sum()) for s in state.values() for k, v in s.items() if k.startswith("exp_avg"))


def test_two_phases_switch_lr_moments_and_snapshot(tiny_checkpoint, tmp_path):
    # steps 0-1: describer rollout (2 PPO epochs); 2-3: locator; 4-5: describer again
    trainer = make_trainer(
        tiny_checkpoint("qwen2_vl"),
        str(tmp_path),
        reward_fn=caption_hash_reward,
        max_steps=6,
        describer_update_steps=1,
        locator_update_steps=2,
        ppo_epochs=2,
        kl_coef=0.05,
        log_rollouts_steps=2,
    )
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen_before, "fix_vit should leave frozen vision parameters"
    seen = []
    original = trainer._begin_step

    def spy(step):
        policy_before, snapshot_before = trainable_vector(trainer.model), _snapshot_vector(trainer)
        original(step)
        seen.append(
            dict(
                step=step,
                policy_before=policy_before,
                snapshot_before=snapshot_before,
                snapshot_after=_snapshot_vector(trainer),
                moments=_moments(trainer),
                lr=innermost_optimizer(trainer.optimizer).param_groups[0]["lr"],
            )
        )

    trainer._begin_step = spy
    trainer.train()
    by_step = {r["step"]: r for r in seen}
    assert sorted(by_step) == [0, 1, 2, 3, 4, 5]
    assert [by_step[s]["lr"] for s in range(6)] == [1e-3, 1e-3, 2e-3, 2e-3, 1e-3, 1e-3]
    # describer steps moved the weights; the snapshot stayed at the phase start until the switch
    assert not torch.equal(by_step[2]["policy_before"], by_step[0]["policy_before"])
    assert torch.equal(by_step[2]["snapshot_before"], by_step[0]["policy_before"])
    # at each switch the snapshot is re-synced to the current weights and Adam's moments are zeroed
    for switch in (2, 4):
        assert torch.equal(by_step[switch]["snapshot_after"], by_step[switch]["policy_before"])
        assert by_step[switch]["moments"] == 0.0
    assert by_step[3]["moments"] > 0.0  # ... and then refill
    # mid-phase the snapshot is not touched
    assert torch.equal(by_step[3]["snapshot_after"], by_step[2]["snapshot_after"])
    # locator steps moved the weights too
    assert not torch.equal(by_step[4]["policy_before"], by_step[2]["policy_before"])
    # fix_vit: the frozen tower never moved
    for name, value in frozen_before.items():
        assert torch.equal(dict(trainer.model.named_parameters())[name], value), name
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["phase"] for h in logs] == ["describer", "describer", "locator", "locator", "describer", "describer"]
    assert [h["phase/describer"] for h in logs] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    # weight_decay is 0 (tests/helpers.py): the weights below move only because the advantage is not 0
    assert logs[0]["describer/nonzero_advantage"] > 0 and logs[0]["describer/advantage"] != 0
    assert [h["learning_rate"] for h in logs] == [1e-3, 1e-3, 2e-3, 2e-3, 1e-3, 1e-3]
    for key in (
        "describer/reward",
        "describer/baseline",
        "describer/greedy_reward",
        "describer/advantage",
        "describer/kl",
        "describer/kl_coef",
        "describer/clip_frac",
        "describer/ratio",
        "describer/policy_kl",
        "describer/parse_failure",
    ):
        assert key in logs[0], key
    assert "locator/loss" in logs[2] and logs[2]["locator/loss"] > 0
    assert logs[0]["describer/parse_failure"] == 1.0
    # --log_rollouts_steps 2: a PNG grid of the rollouts drawn at steps 0 and 4 (describer, step % 2 == 0)
    pictures = sorted(p.name for p in (tmp_path / "rollouts").iterdir())
    assert pictures == ["step0000000.png", "step0000004.png"]  # a random model writes no box: reported, not hidden


def test_ratio_guard_skips_the_update_entirely(tiny_checkpoint, tmp_path):
    trainer = make_trainer(
        tiny_checkpoint("qwen2_vl"),
        str(tmp_path),
        reward_fn=caption_hash_reward,
        max_steps=2,
        describer_update_steps=1,
        locator_update_steps=1,
        ppo_epochs=2,
        ratio_threshold=0.5,
    )  # ratio 1 > 0.5: always skip
    before = trainable_vector(trainer.model)
    trainer.train()
    assert torch.equal(trainable_vector(trainer.model), before)  # no step: not even weight decay moved them
    assert len(innermost_optimizer(trainer.optimizer).state) == 0  # Adam never stepped
    assert [h["describer/skipped"] for h in trainer.state.log_history if "loss" in h] == [1.0, 1.0]


def test_policy_kl_early_stop_prevents_the_next_update(tiny_checkpoint, tmp_path):
    trainer = make_trainer(
        tiny_checkpoint("qwen2_vl"),
        str(tmp_path),
        reward_fn=caption_hash_reward,
        max_steps=3,
        describer_update_steps=1,
        locator_update_steps=1,
        ppo_epochs=3,
    )
    trainer.args.policy_kl_stop = -1e9  # any KL "exceeds" it (past the flag's > 0 check, for this test only)
    after = {}
    original = trainer._begin_step

    def spy(step):
        after[step] = trainable_vector(trainer.model)
        original(step)

    trainer._begin_step = spy
    trainer.train()
    final = trainable_vector(trainer.model)
    assert not torch.equal(after[1], after[0])  # epoch 0 updated
    assert torch.equal(after[2], after[1]) and torch.equal(final, after[1])  # epochs 1 and 2 were stopped
    assert [h["describer/skipped"] for h in trainer.state.log_history if "loss" in h] == [0.0, 1.0, 1.0]


def test_resume_mid_rollout_matches_uninterrupted_run(tiny_checkpoint, tmp_path):
    common = dict(max_steps=6, describer_update_steps=2, locator_update_steps=2, ppo_epochs=2)
    full = make_trainer(
        tiny_checkpoint("qwen2_vl"), str(tmp_path / "full"), reward_fn=caption_hash_reward, save_strategy="steps",
        save_steps=3, **common
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    state = json.loads((checkpoint / "sc_tune_state.json").read_text())
    assert state == {**state, "next_step": 3, "phase": "describer", "step_in_phase": 3, "ppo_epoch": 1}
    assert (checkpoint / "snapshot_rank0.pt").exists() and (checkpoint / "rollouts_rank0.pt").exists()

    resumed = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path / "resumed"), reward_fn=caption_hash_reward,
                           **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > 3]  # noqa: E731
    assert len(losses(resumed)) == 3
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5, abs=1e-7)
    assert torch.allclose(trainable_vector(resumed.model), trainable_vector(full.model), atol=1e-6)


def test_a_mid_phase_resume_restores_the_snapshot(tiny_checkpoint, tmp_path):
    # step 0: describer (moves the weights); steps 1-2: locator, whose snapshot is the weights after step 0. The
    # checkpoint before step 2 is mid-phase: a resume must read the snapshot back, not copy the policy it loaded.
    common = dict(max_steps=3, describer_update_steps=1, locator_update_steps=2, ppo_epochs=1)
    full = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path / "full"), reward_fn=caption_hash_reward,
                        save_strategy="steps", save_steps=2, **common)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = torch.load(checkpoint / "snapshot_rank0.pt", weights_only=True)
    resumed = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path / "resumed"), reward_fn=caption_hash_reward,
                           **common)
    start = {n: t.clone() for n, t in resumed.snapshot.named_local_tensors().items()}  # a copy of the start weights
    assert any(not torch.equal(start[n], saved[n]) for n in saved)  # the test can tell the two apart
    resumed.train(resume_from_checkpoint=str(checkpoint))
    restored = resumed.snapshot.named_local_tensors()
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[n].cpu(), saved[n]) for n in saved)
    assert all(torch.equal(restored[n], t) for n, t in full.snapshot.named_local_tensors().items())


class _FixedLogits(torch.nn.Module):
    """A "model" whose logits are given: ``logits_BWV`` for every column of the batch."""

    def __init__(self, logits_BWV):
        super().__init__()
        self.logits_BWV = logits_BWV

    def forward(self, input_ids, attention_mask, logits_to_keep, use_cache):
        assert input_ids.shape == self.logits_BWV.shape[:2]
        return SimpleNamespace(logits=self.logits_BWV[:, -logits_to_keep:])


def test_the_locator_loss_is_the_cross_entropy_of_each_box_token_given_the_tokens_before_it(tiny_checkpoint,
                                                                                             tmp_path):
    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path), max_steps=1)
    generator = torch.Generator().manual_seed(0)
    logits_BWV = torch.randn(2, 6, 5, generator=generator) * 3
    # Left-padded rows, the answer at the end: 3 box tokens in row 0, 2 in row 1.
    labels_BW = torch.tensor([[-100, -100, -100, 3, 1, 4], [-100, -100, -100, -100, 2, 0]])
    inputs = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    loss = trainer.compute_loss(_FixedLogits(logits_BWV), LocatorRollout(inputs, labels_BW, target_len=3))
    terms = []
    for b in range(2):
        for t in range(6):
            if labels_BW[b, t] != -100:  # token t is predicted by the logits at column t - 1
                row = [float(x) for x in logits_BWV[b, t - 1]]
                terms.append(math.log(sum(math.exp(x) for x in row)) - row[int(labels_BW[b, t])])
    assert len(terms) == 5
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_later_ppo_epochs_keep_the_first_epochs_old_log_probs(tiny_checkpoint, tmp_path):
    # One rollout, three PPO epochs: the old policy of the ratio is the pre-update one for all three.
    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path), reward_fn=caption_hash_reward,
                           cycle=RecordingCycle, max_steps=3, describer_update_steps=1, locator_update_steps=0,
                           ppo_epochs=3, ratio_threshold=1e9, policy_kl_stop=1e9)
    old_logp = []

    class KeepOldLogp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            old_logp.append(trainer.cycle.made[0][1].rollout.old_logp_NT.clone())

    trainer.add_callback(KeepOldLogp())
    trainer.train()
    assert len(trainer.cycle.made) == 1 and len(old_logp) == 3
    assert torch.equal(old_logp[1], old_logp[0]) and torch.equal(old_logp[2], old_logp[0])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # After the first update the policy differs from the old one: ratios move away from 1, the policy KL estimate
    # (the mean of -log ratio, of either sign) from 0. Refreshed old log-probs would give exactly 1 and 0.
    for later in logs[1:]:
        assert abs(later["describer/ratio"] - 1) > 1e-3 and abs(later["describer/policy_kl"]) > 1e-4, later
    assert logs[0]["describer/ratio"] == 1.0 and logs[0]["describer/policy_kl"] == 0.0


def test_bad_schedule_arguments_are_rejected(tmp_path):
    from sc_tune.arguments import SCTuneConfig

    with pytest.raises(ValueError, match="cannot both be 0"):
        SCTuneConfig(output_dir=str(tmp_path), describer_update_steps=0, locator_update_steps=0, use_cpu=True)
    with pytest.raises(ValueError, match="ppo_epochs"):
        SCTuneConfig(output_dir=str(tmp_path), ppo_epochs=0, use_cpu=True)


def test_finetune_cli_runs_and_exports_a_reloadable_checkpoint(tiny_checkpoint, tmp_path):
    import finetune
    from sc_tune.modeling import load_model_and_adapter
    from tests.conftest import SAMPLE_DATA, SAMPLE_IMAGES

    out = tmp_path / "out"
    trainer = finetune.main(
        [
            "--model_name_or_path",
            tiny_checkpoint("qwen3_vl"),
            "--data_path",
            SAMPLE_DATA,
            "--image_folder",
            SAMPLE_IMAGES,
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--describer_update_steps",
            "1",
            "--locator_update_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--use_cpu",
            "True",
            "--skip_preflight",
            "True",
            "--describer_max_new_tokens",
            "4",
            "--locator_max_new_tokens",
            "6",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
        ]
    )
    reloaded, adapter = load_model_and_adapter(str(out))
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), dict(reloaded.named_parameters())[name]), name
    assert type(adapter).__name__ == "Qwen3VLAdapter"
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.describer_update_steps, args.locator_update_steps, args.kl_coef) == (1, 1, 0.01)
    assert os.path.exists(out / "preprocessor_config.json")


def test_with_two_micro_batches_the_logged_loss_is_their_mean_and_a_skipped_one_still_joins_the_backward(
        tiny_checkpoint, tmp_path):
    """Each micro-batch's loss is divided by the accumulation steps before its backward, so a step's gradient is that
    of the micro-batches' mean loss: the Trainer's logged ``loss`` (the sum of what ``training_step`` returns) is the
    mean of the role's own loss over the step's micro-batches, in both phases. A micro-batch whose update is skipped
    after one that left gradients still runs a backward, zero-weighted (DDP's all-reduce and DeepSpeed's accumulation
    boundary count the backwards); one skipped before any runs none. The ratio guard at 1.0 skips nothing here: a
    first epoch's ratio is exactly 1, and the guard skips a ratio that exceeds it."""
    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path), reward_fn=caption_hash_reward, max_steps=3,
                           describer_update_steps=2, locator_update_steps=1, ppo_epochs=1, ratio_threshold=1.0,
                           per_device_train_batch_size=1, gradient_accumulation_steps=2)  # fmt: skip
    # (step, micro-batch) whose update is skipped: step 0's second, after one that left gradients; both of step 1's
    skipped = {(0, 1), (1, 0), (1, 1)}
    compute_loss, backward, backwards = trainer.compute_loss, trainer.accelerator.backward, []

    def skipping(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        if (trainer.state.global_step, trainer._micro) in skipped:
            inputs.skip_update = True
        return loss

    def counted(loss, **kwargs):
        backwards.append((trainer.state.global_step, trainer._micro, float(loss.detach())))
        return backward(loss, **kwargs)

    trainer.compute_loss, trainer.accelerator.backward = skipping, counted
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["phase"] for h in logged] == ["describer", "describer", "locator"]
    for entry in logged:
        assert entry["loss"] == pytest.approx(entry[f"{entry['phase']}/loss"], abs=2e-4), entry
    assert logged[-1]["loss"] > 0.1  # the locator's cross-entropy, far from 0 (a wrong scale shows)
    # the share of answer tokens the model's argmax gets right: few for a random model (here 2 of 33)
    assert 0.0 <= logged[-1]["locator/token_acc"] < 0.5
    assert [(step, micro) for step, micro, _ in backwards] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert backwards[1][2] == 0.0 and backwards[0][2] != 0.0  # step 0's skipped micro-batch: zero-weighted


def test_each_log_reports_its_windows_phases_and_the_learning_rate_its_last_step_used(tiny_checkpoint, tmp_path):
    """Logged every 2 steps of a schedule of 2 describer steps and 1 locator step: the phase names of the window, the
    share of describer steps in it, and the learning rate of its last step."""
    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path), reward_fn=caption_hash_reward, max_steps=6,
                           describer_update_steps=2, locator_update_steps=1, ppo_epochs=1, logging_steps=2,
                           describer_lr=1e-3, locator_lr=3e-3)  # fmt: skip
    trainer.train()
    logged = [(h["phase"], h["phase/describer"], h["learning_rate"]) for h in trainer.state.log_history if "loss" in h]
    # steps 0-1 describer; 2 locator, 3 describer; 4 describer, 5 locator
    assert logged == [("describer", 1.0, 1e-3), ("locator+describer", 0.5, 1e-3), ("describer+locator", 0.5, 3e-3)]
