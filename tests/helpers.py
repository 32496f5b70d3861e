"""Shared helpers for trainer tests: build an SCTuneTrainer on a tiny model and the bundled sample."""

from __future__ import annotations

import torch

from sc_tune.arguments import SCTuneConfig
from sc_tune.data import ReferringDataset
from sc_tune.modeling import freeze_vision_tower, load_model_and_adapter
from sc_tune.trainer import SCTuneTrainer
from tests.conftest import SAMPLE_DATA, SAMPLE_IMAGES

FAST = dict(
    per_device_train_batch_size=4,
    describer_max_new_tokens=6,
    describer_min_new_tokens=2,
    locator_max_new_tokens=8,
    locator_min_new_tokens=0,
    caption_lr=1e-3,
    bbox_lr=2e-3,
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    seed=0,
    dataloader_num_workers=0,
)


def make_trainer(checkpoint: str, output_dir: str, model_transform=None, **overrides) -> SCTuneTrainer:
    args = SCTuneConfig(output_dir=output_dir, **{**FAST, **overrides})
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(checkpoint)
    freeze_vision_tower(model, adapter)
    if model_transform is not None:
        model = model_transform(model, adapter)
    dataset = ReferringDataset.from_file(SAMPLE_DATA, SAMPLE_IMAGES)
    return SCTuneTrainer(model=model, args=args, adapter=adapter, train_dataset=dataset)


def trainable_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])


def fake_iou(pred_boxes, target_B4):
    """A reward with signal even though a random model writes no parseable box: depends on the row."""
    generator = torch.Generator().manual_seed(len(pred_boxes) + int(target_B4.sum() * 1000))
    return torch.rand(len(pred_boxes), generator=generator)
