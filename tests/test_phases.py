import pytest
import torch

from sc_tune.phases import Phase, PhaseLR, PhaseSchedule, reset_optimizer_moments, set_learning_rate


def test_schedule_positions_over_a_cycle():
    s = PhaseSchedule(describer_rollouts=2, locator_steps=3, ppo_epochs=2, describer_lr=1e-3, locator_lr=2e-3)
    got = [(p.phase, p.step_in_phase, p.ppo_epoch, p.needs_rollout) for p in map(s.at, range(8))]
    D, L = Phase.DESCRIBER, Phase.LOCATOR
    assert got == [(D, 0, 0, True), (D, 1, 1, False), (D, 2, 0, True), (D, 3, 1, False),
                   (L, 0, 0, True), (L, 1, 0, True), (L, 2, 0, True), (D, 0, 0, True)]
    assert [s.lr_at(i) for i in (0, 3, 4, 6, 7)] == [1e-3, 1e-3, 2e-3, 2e-3, 1e-3]
    assert s.at(7).starts_phase and s.at(4).starts_phase and not s.at(5).starts_phase


def test_reference_defaults_cycle_is_500_steps():
    s = PhaseSchedule(200, 100, 2, 5e-7, 1e-6)
    assert s.cycle_steps == 500 and s.at(399).phase is Phase.DESCRIBER and s.at(400).phase is Phase.LOCATOR


def test_describer_only_and_locator_only():
    d = PhaseSchedule(3, 0, 2, 1.0, 2.0)
    assert all(d.at(i).phase is Phase.DESCRIBER for i in range(20))
    assert [d.at(i).starts_phase for i in range(8)] == [True] + [False] * 7  # snapshot synced once
    loc = PhaseSchedule(0, 4, 2, 1.0, 2.0)
    assert all(loc.at(i).phase is Phase.LOCATOR and loc.at(i).needs_rollout for i in range(9))
    # the locator phase never ends either: its steps count on and the snapshot is synced once
    assert [loc.at(i).step_in_phase for i in range(9)] == list(range(9))
    assert [loc.at(i).starts_phase for i in range(9)] == [True] + [False] * 8


def test_reset_optimizer_moments_and_set_lr():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].abs().sum() > 0
    reset_optimizer_moments(opt)
    assert state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0 and state["step"].item() == 0
    set_learning_rate(opt, 0.5)
    assert opt.param_groups[0]["lr"] == 0.5
    # After a reset the next step is bias-corrected like a first step: the update is lr * sign(grad).
    before = p.detach().clone()
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.step()
    assert (before - p.detach()).tolist() == pytest.approx([0.5] * 3, rel=1e-4)


def test_reset_optimizer_moments_zeroes_integer_step_counters_under_wrappers():
    """DeepSpeed's Adam variants count steps in plain ints, some in the param group, and sit under accelerate's and
    DeepSpeed's wrappers (each holding the next in ``.optimizer``)."""

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    p = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.SGD([p], lr=0.1)
    inner.state[p] = {"step": 7, "exp_avg": torch.ones(3)}
    inner.param_groups[0]["step"] = 7
    reset_optimizer_moments(Wrapper(Wrapper(inner)))
    assert inner.state[p]["step"] == 0 and inner.param_groups[0]["step"] == 0
    assert inner.state[p]["exp_avg"].tolist() == [0.0] * 3


def test_phase_lr_reads_the_schedule_and_pickles():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    step = {"now": 0}
    sched = PhaseLR(opt, lambda: 0.1 if step["now"] < 2 else 0.2)
    step["now"] = 3
    sched.step()
    assert sched.get_last_lr() == [0.2] and opt.param_groups[0]["lr"] == 0.2
    assert "lr_fn" not in sched.state_dict()
    torch.save(sched.state_dict(), "/dev/null")
