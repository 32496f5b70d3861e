"""A scheduler's stop signal saves the step in progress (sc_tune.preemption, finetune.py --save_on_signal).

The whole path (signal to the process group inside a step, checkpoint, exit status, exact resume) is in
tests/test_checkpoints.py; through scripts/finetune_ds.sh and torchrun on two processes in tests/test_distributed.py.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import TrainerControl, TrainerState

from sc_tune.arguments import ArgumentError
from sc_tune.preemption import SaveAndStopOnSignal, parse_signals, workers_ignoring


def test_signal_names_are_read_and_a_bad_one_is_named():
    assert parse_signals("SIGTERM,SIGUSR1") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals(" term , usr1,SIGTERM") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals("none") == parse_signals("") == ()
    for bad in ("SIGKILL", "SIGNOPE", "TERM;rm", "SIGCHLD", "SIGPIPE", "SIGSEGV"):  # CHLD: every data worker's exit
        with pytest.raises(ArgumentError, match="--save_on_signal"):
            parse_signals(bad)


def own_values(tensor):
    return tensor  # one process: the gathered values are its own


def step_end(stop, step, max_steps=100):
    state, control = TrainerState(), TrainerControl()
    state.global_step, state.max_steps = step, max_steps
    stop.on_step_end(None, state, control)
    return control


def test_a_signal_during_training_stops_after_the_step_in_progress_with_a_checkpoint():
    stop = SaveAndStopOnSignal((signal.SIGUSR1,), own_values)
    before = signal.getsignal(signal.SIGUSR1)
    with stop.listening():
        control = step_end(stop, 1)
        assert not control.should_save and not control.should_training_stop
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded only: this process goes on
        control = step_end(stop, 2)
    assert control.should_save and control.should_training_stop
    assert (stop.stopped_by, stop.stopped_at_step) == (signal.SIGUSR1, 2)
    assert signal.getsignal(signal.SIGUSR1) is before  # the default action again outside training


def test_a_signal_another_process_got_stops_this_one_at_the_same_step():
    """Processes receive a scheduler's signal at different moments, or one alone gets it: they must agree, or one
    would wait in the checkpoint's collectives for the others for ever."""
    stop = SaveAndStopOnSignal((signal.SIGTERM,), lambda mine: torch.cat([mine, torch.tensor([int(signal.SIGTERM)])]))
    control = step_end(stop, 7)
    assert control.should_save and control.should_training_stop
    assert (stop.stopped_by, stop.stopped_at_step) == (signal.SIGTERM, 7)

    nobody = SaveAndStopOnSignal((signal.SIGTERM,), lambda mine: torch.cat([mine, torch.tensor([0])]))
    assert not step_end(nobody, 7).should_save and nobody.stopped_by is None


def test_a_signal_in_the_last_step_saves_and_lets_the_run_finish_and_export():
    stop = SaveAndStopOnSignal((signal.SIGUSR1,), own_values)
    with stop.listening():
        os.kill(os.getpid(), signal.SIGUSR1)
        control = step_end(stop, 100, max_steps=100)
    assert control.should_save and not control.should_training_stop  # the Trainer ends the run itself
    assert stop.stopped_by is None  # finetune.py exports as usual


def test_outside_training_a_stop_signal_ends_the_process_through_system_exit():
    """So that ``finally`` blocks run (the run lock is released), with the status the signal's default gives."""
    from sc_tune.preemption import exiting_on

    before = signal.getsignal(signal.SIGUSR1)
    released = []
    with pytest.raises(SystemExit) as stopped:
        with exiting_on((signal.SIGUSR1,)):
            try:
                os.kill(os.getpid(), signal.SIGUSR1)
                for _ in range(1000):  # the handler runs at the next bytecode
                    pass
            finally:
                released.append(True)
    assert stopped.value.code == 128 + signal.SIGUSR1 and released == [True]
    assert signal.getsignal(signal.SIGUSR1) is before


def test_no_signals_asked_for_means_no_collective_and_no_stop():
    def gather(_):
        raise AssertionError("a collective was run")

    stop = SaveAndStopOnSignal((), gather)
    with stop.listening():
        assert not step_end(stop, 1).should_training_stop


class WorkerSigterm(Dataset):
    """Each item: whether the data worker that loads it ignores SIGTERM, and whether its own init ran."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return [int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN), int(os.environ.get("WORKER_INIT") == "ran")]


def mark_init(worker_id):
    os.environ["WORKER_INIT"] = "ran"  # in the worker's process only


def test_data_workers_ignore_the_stop_signals_and_still_run_the_trainers_init():
    """torch's data workers die on SIGTERM (a C handler), and a scheduler signals them too: the training process
    would fail on its next batch before saving. SCTuneTrainer.get_train_dataloader installs this."""
    loader = DataLoader(WorkerSigterm(), batch_size=None, num_workers=1,
                        worker_init_fn=workers_ignoring((signal.SIGTERM,), mark_init))
    assert [list(x) for x in loader] == [[1, 1], [1, 1]]
    plain = DataLoader(WorkerSigterm(), batch_size=None, num_workers=1, worker_init_fn=mark_init)
    assert [list(x) for x in plain] == [[0, 1], [0, 1]]  # what the test tells apart: torch's own handler
    assert workers_ignoring((), mark_init) is mark_init
