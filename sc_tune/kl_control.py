"""The coefficient of the describer's KL penalty: fixed (the reference) or adaptive.

``adaptive`` is the proportional controller of Ziegler et al. (2019), "Fine-Tuning Language Models from
Human Preferences": after each rollout, with ``e = clip(KL / target - 1, -0.2, 0.2)`` the observed
per-caption KL's relative error,

    coef <- coef * (1 + e * n / horizon)

where ``n`` is the number of captions the KL was measured on (all ranks). The coefficient grows while the
policy drifts further from the snapshot than ``target`` nats per caption and shrinks while it stays
closer; ``horizon`` (in captions) sets how fast. The clip keeps one odd batch from moving it much.

A controller's whole state is ``state_dict()``, a small plain dict that the trainer writes into its
checkpoint's JSON state, so a resumed run continues with the same coefficient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

KL_CONTROLLERS = ("fixed", "adaptive")
MAX_RELATIVE_ERROR = 0.2  # Ziegler et al.'s clip of the proportional error


class KLController(ABC):
    def __init__(self, value: float):
        self.value = float(value)

    @abstractmethod
    def update(self, observed_kl: float, num_captions: int) -> None:
        """Adjust ``value`` after a rollout whose mean per-caption KL was ``observed_kl``."""

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint has a {state.get('kind')!r} KL controller, this run a {self.kind!r} one")
        self.value = float(state["value"])


class FixedKLController(KLController):
    kind = "fixed"

    def update(self, observed_kl: float, num_captions: int) -> None:
        pass


class AdaptiveKLController(KLController):
    kind = "adaptive"

    def __init__(self, value: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL control needs kl_target > 0 and kl_horizon > 0, got {target}, {horizon}")
        super().__init__(value)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, observed_kl: float, num_captions: int) -> None:
        if num_captions > self.horizon:
            # Past that, one update could move the coefficient by more than 20 % (or make it negative).
            raise ValueError(
                f"--kl_horizon ({self.horizon:g} captions) must be at least the captions of one rollout "
                f"({num_captions}, all ranks)"
            )
        error = min(max(observed_kl / self.target - 1.0, -MAX_RELATIVE_ERROR), MAX_RELATIVE_ERROR)
        self.value *= 1.0 + error * num_captions / self.horizon


def make_kl_controller(args) -> KLController:
    if args.kl_controller == "fixed":
        return FixedKLController(args.kl_coef)
    if args.kl_controller == "adaptive":
        return AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
    raise ValueError(f"unknown --kl_controller {args.kl_controller!r}; choose one of {', '.join(KL_CONTROLLERS)}")
