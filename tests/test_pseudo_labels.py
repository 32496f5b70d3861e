"""``--pseudo_label_min_iou``: the locator phase leaves out the pseudo-labels whose caption the snapshot's own locator
grounds elsewhere, and a micro-batch that keeps none adds a loss of 0, not NaN."""

from __future__ import annotations

import torch

from sc_tune.cycle import RolloutCycle
from tests.helpers import make_trainer


class FixedLocatorCycle(RolloutCycle):
    """Locates each caption at a box chosen per row against the micro-batch's true boxes: row 0 exactly, row 1 in a
    far corner, row 2 no box at all (a parse failure), row 3 shifted to IoU 0.6 with the true box."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.true_boxes, self.locate_calls = None, 0

    def locator_rollouts(self, batches, seeds=None):
        self.true_boxes = [box for inputs in batches for box in inputs["boxes"].tolist()]
        return super().locator_rollouts(batches, seeds)

    def locate(self, model, images, captions):
        self.locate_calls += 1
        assert len(captions) == len(self.true_boxes) == 4
        x1, y1, x2, y2 = self.true_boxes[3]
        shift = (x2 - x1) / 4  # IoU of a box moved by a quarter of its width: 0.75 / 1.25 = 0.6
        boxes = [self.true_boxes[0], [0.0, 0.0, 1e-3, 1e-3], None, [x1 + shift, y1, x2 + shift, y2]]
        return boxes, ["(fixed)"] * 4

    def locate_from_prefix(self, model, images, captions, scored, source_rows):
        return self.locate(model, images, captions)  # the filter is under test here, not how the snapshot locates


def _rollout(tiny_checkpoint, tmp_path, min_iou):
    trainer = make_trainer(tiny_checkpoint("qwen2_5_vl"), str(tmp_path / str(min_iou)), cycle=FixedLocatorCycle,
                           pseudo_label_min_iou=min_iou)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.snapshot.sync_from_policy()
    torch.manual_seed(0)
    return trainer, trainer.cycle.locator_rollout(batch)


def test_pseudo_labels_the_snapshot_grounds_elsewhere_are_left_out(tiny_checkpoint, tmp_path):
    kept_all_trainer, kept_all = _rollout(tiny_checkpoint, tmp_path, 0.0)
    assert kept_all_trainer.cycle.locate_calls == 0 and "pseudo_labels_kept" not in kept_all.metrics
    trainer, filtered = _rollout(tiny_checkpoint, tmp_path, 0.5)
    assert trainer.cycle.locate_calls == 1
    labels, reference = filtered.rollout.labels, kept_all.rollout.labels
    assert torch.equal(filtered.rollout.inputs["input_ids"], kept_all.rollout.inputs["input_ids"])
    assert (reference != -100).sum(1).min() > 0  # every row had a target to leave out
    assert torch.equal(labels[[0, 3]], reference[[0, 3]])  # grounded at IoU 1 and 0.6: kept as they were
    assert bool((labels[[1, 2]] == -100).all())  # grounded elsewhere, or not at all: no loss
    assert float(filtered.metrics["pseudo_labels_kept"]) == 0.5
    assert filtered.rollout.target_len == kept_all.rollout.target_len

    model = trainer.model.train()
    loss = trainer.compute_loss(model, filtered.rollout)
    reference_loss = trainer.compute_loss(model, kept_all.rollout)
    assert torch.isfinite(loss) and not torch.isclose(loss, reference_loss)


def test_a_micro_batch_that_keeps_no_pseudo_label_adds_a_zero_loss(tiny_checkpoint, tmp_path):
    trainer, filtered = _rollout(tiny_checkpoint, tmp_path, 1.0)
    assert float(filtered.metrics["pseudo_labels_kept"]) == 0.25  # only row 0 grounds at IoU 1, the threshold
    rollout = filtered.rollout
    rollout.labels[0] = -100  # and now none
    model = trainer.model.train()
    loss = trainer.compute_loss(model, rollout)
    assert float(loss.detach()) == 0.0
    loss.backward()  # a graph every rank can run backward through (DeepSpeed expects one), with zero gradients
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)


class LocateRecordingCycle(RolloutCycle):
    """The trainer's cycle, keeping what each locate call found; locating from the captions' image prefix is checked
    against a fresh locate call on the spot."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.found, self.from_prefix = [], []

    def locate(self, model, images, captions):
        found, texts = super().locate(model, images, captions)
        self.found.append(found)
        return found, texts

    def locate_from_prefix(self, model, images, captions, scored, source_rows):
        resumed = super().locate_from_prefix(model, images, captions, scored, source_rows)
        self.from_prefix.append(resumed is not None)
        if resumed is not None:
            assert resumed == super().locate(model, images, captions), "differs from a fresh prefill"
            self.found.append(resumed[0])
        return resumed


def test_on_a_warm_start_the_filter_keeps_what_its_own_locator_grounds_back(tmp_path):
    """The real path, on the committed warm start (whose locator writes boxes that parse) and shapes scenes: the
    snapshot locates its own captions; a row keeps its pseudo-label, unchanged, exactly where the box found has
    IoU >= 0.5 with the true box, and some rows of each kind occur."""
    from sc_tune.boxes import box_iou
    from sc_tune.data import ReferringDataset
    from sc_tune.synthetic.shapes import write_split
    from tests.conftest import WARM_START

    write_split(tmp_path / "data", "train", 12, seed=4)
    dataset = ReferringDataset.from_file(str(tmp_path / "data" / "train.json"), str(tmp_path / "data"))
    rollouts, trainers = {}, {}
    for min_iou in (0.0, 0.5):
        trainer = make_trainer(WARM_START, str(tmp_path / str(min_iou)), dataset=dataset, cycle=LocateRecordingCycle,
                               pseudo_label_min_iou=min_iou, per_device_train_batch_size=32, locator_max_new_tokens=32,
                               describer_max_new_tokens=8)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.snapshot.sync_from_policy()
        rollouts[min_iou], trainers[min_iou] = trainer.cycle.locator_rollout(batch), trainer
    (found,) = trainers[0.5].cycle.found
    assert trainers[0.5].cycle.from_prefix == [True], "the captions were located from their prompts' image prefix"
    assert float(rollouts[0.5].metrics["pseudo_label_prefix_cache"]) == 1.0
    assert all(box is not None for box in found), "the warm start's boxes parse"
    iou_B = box_iou(torch.tensor(found), batch["boxes"].float())
    kept_all, filtered = rollouts[0.0].rollout.labels, rollouts[0.5].rollout.labels
    kept_B = (filtered != -100).any(1)
    assert torch.equal(kept_B, iou_B >= 0.5)
    assert 0 < int(kept_B.sum()) < len(kept_B), "the warm start grounds some of its captions back, not all"
    assert torch.equal(filtered[kept_B], kept_all[kept_B])
    assert float(rollouts[0.5].metrics["pseudo_labels_kept"]) == float(kept_B.float().mean())
