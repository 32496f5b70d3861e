"""The trainer's locator path with the snapshot made to write its family's answers: the describer rollout's cycle IoU
rewards and the locator phase's pseudo-label filter (``--pseudo_label_min_iou``) see the boxes those answers hold.

tests/test_pseudo_labels.py proves the filter on boxes handed to it (its cycle's ``locate`` returns them) and, on the
warm start, Qwen3-VL's real path; tests/test_cycle.py proves which true box each reward is scored against. Here the
snapshot itself writes, token by token, answers in families' own forms (pixel JSON, special-token boxes, y-first,
GLM's box tokens) whose boxes sit at known places against the true boxes, and the trainer's own ``locate`` (or
``locate_from_prefix``) decodes and parses them.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from sc_tune.cycle import RolloutCycle
from sc_tune.rollout import fit_locator_budget
from tests.helpers import ScriptedLogits, make_trainer, tokens_to_box

EXACT, SHIFTED, FAR, NO_BOX = "exact", "shifted", "far", "no box"
# Per micro-batch of four boxes: how the snapshot answers each located row. The describer rollout locates the sampled
# captions (one per box), then the snapshot's greedy ones (the baseline's); the locator phase its greedy captions.
DESCRIBER_PLAN = [EXACT, SHIFTED, FAR, NO_BOX] + [SHIFTED, EXACT, NO_BOX, FAR]
LOCATOR_PLAN = [EXACT, FAR, NO_BOX, SHIFTED]


def written_box(plan: str, true: list[float]) -> list[float] | None:
    """The box the snapshot writes for a caption of the box ``true``: itself, moved by a seventh of its width (IoU
    0.75 before the codec rounds it), a box of the far side of the image that misses it, or none."""
    x1, y1, x2, y2 = true
    if plan == EXACT:
        return list(true)
    if plan == SHIFTED:
        shift = (x2 - x1) / 7 if x2 + (x2 - x1) / 7 <= 1 else -(x2 - x1) / 7
        return [x1 + shift, y1, x2 + shift, y2]
    if plan == FAR:
        return [0.85, 0.85, 1.0, 1.0] if x1 + x2 < 1 else [0.0, 0.0, 0.15, 0.15]
    return None


def iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class ForcedSnapshotCycle(RolloutCycle):
    """The trainer's cycle whose snapshot, wherever it locates, writes the family's answer (``locator_target``) for
    the box its row's plan says, or the end token at once (no box). Checks each locating's boxes, texts (cut at the
    box) and decoding steps, and records what each located row should read back: ``expected`` (the answer text's
    box) and ``true`` (the true box of the row's caption)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan, self.true, self.expected = [], [], []
        self.ways: list[str] = []  # per locating that gave the boxes: "prefix" (from the image prefix) or "prefill"

    def _rows(self, batches, plan, greedy_too: bool):
        boxes = [box for inputs in batches for box in inputs["boxes"].tolist()]
        k = self.args.num_generations
        self.true = [box for box in boxes for _ in range(k)] + (boxes if greedy_too else [])
        self.plan = plan

    def describer_rollouts(self, batches, seeds=None):
        self._rows(batches, DESCRIBER_PLAN, greedy_too=True)
        return super().describer_rollouts(batches, seeds)

    def locator_rollouts(self, batches, seeds=None):
        self._rows(batches, LOCATOR_PLAN, greedy_too=False)
        return super().locator_rollouts(batches, seeds)

    @contextmanager
    def _snapshot_writes_the_plan(self, model, images, captions, way: str):
        """Forces the locating inside; ``found`` (a one-item list) receives its (boxes, texts), or None."""
        adapter = self.adapter
        assert len(captions) == len(self.true) == len(self.plan)
        targets = []
        for plan, true, image, caption in zip(self.plan, self.true, images, captions):
            box = written_box(plan, true)
            targets.append(adapter.end_text if box is None else adapter.locator_target(box, image, caption))
        self.expected = [adapter.parse_locator_output(t, im) for t, im in zip(targets, images)]
        scripts = [adapter.encode_target(t) for t in targets]
        # A row ends with the token that completes its box, or with the end token where it writes none.
        kept = [len(s) if plan == NO_BOX else tokens_to_box(adapter, s) for plan, s in zip(self.plan, scripts)]
        if self.decoding is None:
            steps = max(kept)  # transformers' loop stops at the last row's box
        else:  # SC-Tune's loop runs to the end tokens (or the budget), then cuts each row at its box
            budget = fit_locator_budget(adapter, images, self.greedy_boxes, captions).max_new_tokens
            steps = min(max(map(len, scripts)), budget)
        found = []
        with ScriptedLogits(model) as forcing:
            forcing.write(scripts)
            yield found
        if found[0] is not None:
            boxes, texts = found[0]
            assert boxes == self.expected, way
            assert texts == [adapter.decode(s[:k]) for s, k in zip(scripts, kept)], way
            assert forcing.forwards == steps, way
            self.ways.append(way)

    def locate(self, model, images, captions):
        with self._snapshot_writes_the_plan(model, images, captions, "prefill") as found:
            found.append(super().locate(model, images, captions))
        return found[0]

    def locate_from_prefix(self, model, images, captions, scored, source_rows):
        with self._snapshot_writes_the_plan(model, images, captions, "prefix") as found:
            found.append(super().locate_from_prefix(model, images, captions, scored, source_rows))
        return found[0]

    def expected_ious(self) -> list[float]:
        assert [box is None for box in self.expected] == [plan == NO_BOX for plan in self.plan]
        return [0.0 if box is None else iou(box, true) for box, true in zip(self.expected, self.true)]


# How each family's snapshot locates in the two phases: from the image prefix cached by the scoring pass (describer)
# and by the greedy captions' call (locator), or from a fresh prefill where the family does not share it.
WAYS = {"qwen2_5_vl": ["prefix", "prefix"], "qwen2_vl": ["prefix", "prefix"], "gemma3": ["prefill", "prefill"],
        "glm4v": ["prefill", "prefill"]}


# Answer forms: pixel JSON (Qwen2.5-VL), <|box_start|>(x1,y1),(x2,y2)<|box_end|> special tokens (Qwen2-VL; here also
# through SC-Tune's static loop), y-first box_2d JSON (Gemma 3), <|begin_of_box|>[[..]]<|end_of_box|> (GLM-4.1V).
@pytest.mark.parametrize("model_type,static_decoding", [("qwen2_5_vl", "false"), ("qwen2_vl", "true"),
                                                        ("gemma3", "false"), ("glm4v", "false")])
def test_the_snapshots_written_boxes_are_what_rewards_and_the_pseudo_label_filter_see(model_type, static_decoding,
                                                                                       tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint(model_type), str(tmp_path), cycle=ForcedSnapshotCycle,
                           pseudo_label_min_iou=0.5, static_decoding=static_decoding)
    cycle = trainer.cycle
    assert (cycle.decoding is not None) == (static_decoding == "true")
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.snapshot.sync_from_policy()
    torch.manual_seed(0)

    described = cycle.describer_rollout(batch)
    ious = cycle.expected_ious()
    assert ious[0] > ious[1] > 0.5 and ious[2] == ious[3] == 0.0, ious  # the test can tell the rows apart
    rollout, n = described.rollout, len(batch["boxes"])
    assert rollout.reward_N.tolist() == pytest.approx(ious[:n], abs=1e-6)  # each sampled caption's cycle IoU
    assert rollout.baseline_N.tolist() == pytest.approx(ious[n:], abs=1e-6)  # the snapshot's greedy captions'
    assert described.located == cycle.expected[:n]
    assert float(described.metrics["parse_failure"]) == 0.25

    located = cycle.locator_rollout(batch)
    ious = cycle.expected_ious()
    kept = [value >= 0.5 for value in ious]
    assert kept == [True, False, False, True], ious  # kept: the exact and the shifted box
    assert ((located.rollout.labels != -100).any(1)).tolist() == kept
    assert float(located.metrics["pseudo_labels_kept"]) == 0.5
    # one locating per phase, the forced one: from the image prefix where the family shares it, else a prefill
    assert cycle.ways == ["prefix" if described.metrics["locating_prefix_cache"] == 1.0 else "prefill",
                          "prefix" if located.metrics["pseudo_label_prefix_cache"] == 1.0 else "prefill"]
    assert cycle.ways == WAYS[model_type]
