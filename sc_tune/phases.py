"""The phase schedule and the phase switch: the one place that knows which role trains when.

The schedule is a pure function of the optimizer step, so resuming from a checkpoint lands in the right
phase, at the right step within it, with no saved counter to drift. One cycle is
``describer_update_steps * ppo_epochs`` describer steps followed by ``locator_update_steps`` locator steps.

At every switch (and at step 0) the switch resets the Adam moments, so each phase starts its optimizer
afresh as the reference intended, and re-syncs the frozen snapshot to the current weights. Every step
sets the phase's constant learning rate directly on the optimizer's param groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Phase(str, Enum):
    DESCRIBER = "describer"
    LOCATOR = "locator"


@dataclass(frozen=True)
class PhasePosition:
    phase: Phase
    step_in_phase: int  # optimizer steps since the phase started
    ppo_epoch: int  # 0 for a fresh rollout (and always 0 in the locator phase)

    @property
    def starts_phase(self) -> bool:
        return self.step_in_phase == 0

    @property
    def needs_rollout(self) -> bool:
        """Whether this step draws a new batch (a locator step, or a describer rollout's first epoch)."""
        return self.ppo_epoch == 0


@dataclass(frozen=True)
class PhaseSchedule:
    describer_rollouts: int  # describer_update_steps
    locator_steps: int  # locator_update_steps
    ppo_epochs: int
    describer_lr: float
    locator_lr: float

    @classmethod
    def from_args(cls, args) -> PhaseSchedule:
        return cls(args.describer_update_steps, args.locator_update_steps, args.ppo_epochs, args.describer_lr, args.locator_lr)

    @property
    def describer_steps(self) -> int:
        return self.describer_rollouts * self.ppo_epochs

    @property
    def cycle_steps(self) -> int:
        return self.describer_steps + self.locator_steps

    def at(self, step: int) -> PhasePosition:
        offset = step % self.cycle_steps
        if offset < self.describer_steps:
            # With no locator phase the describer phase never ends: the snapshot is synced once, at step 0.
            in_phase = step if self.locator_steps == 0 else offset
            return PhasePosition(Phase.DESCRIBER, in_phase, offset % self.ppo_epochs)
        in_phase = step if self.describer_steps == 0 else offset - self.describer_steps
        return PhasePosition(Phase.LOCATOR, in_phase, 0)

    def lr_at(self, step: int) -> float:
        return self.describer_lr if self.at(step).phase is Phase.DESCRIBER else self.locator_lr


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (each keeps it in ``.optimizer``)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def set_learning_rate(optimizer, lr: float) -> None:
    for group in innermost_optimizer(optimizer).param_groups:
        group["lr"] = lr


def reset_optimizer_moments(optimizer) -> None:
    """Zero Adam's moments and step counters in place.

    In place rather than ``state.clear()``: ZeRO optimizers hold their state over flat partitions that
    they allocate once, and DeepSpeed's Adam variants keep a step counter in the param group.
    """
    inner = innermost_optimizer(optimizer)
    for state in inner.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value.zero_()
            elif key == "step":
                state[key] = 0
    for group in inner.param_groups:
        if "step" in group:
            group["step"] = 0


class PhaseLR(torch.optim.lr_scheduler.LRScheduler):
    """An LR scheduler that reports (and writes) whatever LR the phase schedule says.

    The Trainer and DeepSpeed step schedulers at different times and DeepSpeed does not step it on a
    skipped update, so this never counts its own steps: ``lr_fn`` reads the trainer's global step. The
    trainer also sets each step's LR directly when the step begins, so the optimizer never depends on
    when (or whether) this is stepped.
    """

    def __init__(self, optimizer, lr_fn):
        self.lr_fn = lr_fn
        super().__init__(optimizer)

    def get_lr(self):
        return [self.lr_fn() for _ in self.optimizer.param_groups]

    def state_dict(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_fn")}

    def load_state_dict(self, state_dict):
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "lr_fn"})
