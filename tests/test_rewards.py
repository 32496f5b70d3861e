"""The cycle reward of each --reward choice against hand-computed values; parse failures score 0 and are counted."""

import pytest
import torch

from sc_tune.arguments import SCTuneConfig
from sc_tune.rewards import REWARDS, cycle_iou, get_reward

# target [0,0,2,2] (area 4) for every row
TARGET = torch.tensor([[0, 0, 2, 2]] * 4, dtype=torch.float32)
PRED = [
    [1, 1, 3, 3],  # overlap 1, union 7: IoU 1/7; hull [0,0,3,3] = 9 -> GIoU 1/7 - 2/9
    [0, 0, 2, 1],  # overlap 2, union 4: IoU 1/2, hull = target -> GIoU 1/2
    None,  # the locator wrote no box
    [3, 0, 4, 2],  # disjoint: IoU 0; hull [0,0,4,2] = 8, union 6 -> GIoU -1/4
]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("iou", [1 / 7, 1 / 2, 0.0, 0.0]),
        ("giou", [(1 / 7 - 2 / 9 + 1) / 2, (1 / 2 + 1) / 2, 0.0, (-1 / 4 + 1) / 2]),
        ("iou_squared", [1 / 49, 1 / 4, 0.0, 0.0]),
        ("iou_threshold", [0.0, 1.0, 0.0, 0.0]),  # IoU >= 0.5 is a hit, inclusive as Acc@0.5
    ],
)
def test_each_reward_hand_computed(name, expected):
    scores = get_reward(name)(PRED, TARGET)
    assert scores.reward_N.tolist() == pytest.approx(expected)
    assert scores.parsed_N.tolist() == [True, True, False, True] and scores.num_parse_failures == 1


def test_a_parse_failure_is_the_worst_reward_under_every_choice():
    # GIoU of a far-away box is negative: mapped to [0, 1], it still beats not answering.
    far = [[90, 90, 100, 100], None]
    for reward in REWARDS.values():
        r = reward(far, TARGET[:2]).reward_N
        assert r[1] == 0.0 and r[0] >= r[1], reward.name


def test_cycle_iou_is_the_evaluators_score_and_rejects_mismatched_lengths():
    from sc_tune.evaluation.metrics import per_sample_ious

    assert per_sample_ious(PRED, TARGET.tolist()) == pytest.approx(cycle_iou(PRED, TARGET).reward_N.tolist())
    with pytest.raises(ValueError, match="3 predicted boxes for 4 targets"):
        cycle_iou(PRED[:3], TARGET)


def test_reward_flag_is_checked(tmp_path):
    with pytest.raises(ValueError, match="--reward must be one of iou, giou, iou_squared, iou_threshold"):
        SCTuneConfig(output_dir=str(tmp_path), reward="dice", use_cpu=True)
    with pytest.raises(ValueError, match="unknown reward 'dice'"):
        get_reward("dice")
