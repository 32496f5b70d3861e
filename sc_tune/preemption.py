"""Stopping on a scheduler's signal with a checkpoint, not a lost run (``--save_on_signal``).

A scheduler stops a job with a signal and kills it a grace period later: SLURM sends SIGTERM at preemption or at the
time limit (and SIGUSR1 minutes earlier with ``--signal=USR1@<seconds>``), Kubernetes SIGTERM at eviction. By
default the processes die at once and the run loses every step since its last checkpoint (``--save_steps 500``, one
cycle: an hour or more at real size, on every GPU of the job).

Here the signal only records that a stop was asked for. At the end of the step in progress every process agrees on
it (one all-gather of a number per step, so that processes that got the signal at different moments, or not at all,
stop after the same step), the Trainer writes its usual checkpoint (staged and verified, ``sc_tune.checkpoints``)
and training stops. finetune.py then skips the export (the run is not finished), names the checkpoint, and exits
with 128 + the signal's number, the status the signal itself would have given, so that nothing downstream takes the
run for a finished one. ``--resume_from_checkpoint True`` continues from that checkpoint exactly.

A signal in the last step changes nothing but a checkpoint first: the run ends, and exports, as it would have.
Outside training (loading, the image check, the export) a signal ends the process at once, as its default action
would, but through ``SystemExit(128 + n)`` (``exiting_on``), so that the run lock is released: there is no step to
save there, and a resume at ``--max_steps`` writes the export again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal

import torch
from transformers import TrainerCallback

from sc_tune.arguments import ArgumentError

logger = logging.getLogger(__name__)

# Signals that ask a process to stop. Not the others: SIGCHLD comes whenever a data worker exits, SIGPIPE, SIGALRM or
# a crash signal is no request to stop, and SIGKILL and SIGSTOP cannot be handled.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)


def parse_signals(spec: str) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` (names with or without ``SIG``, any case) -> the signals; ``"none"`` or ``""`` -> ()."""
    names = [name.strip().upper() for name in str(spec).split(",") if name.strip()]
    if names in ([], ["NONE"]):
        return ()
    found = []
    for name in names:
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if sig not in STOP_SIGNALS:
            raise ArgumentError(
                f"--save_on_signal: {name} is not a signal that asks a run to stop (one of "
                f"{', '.join(s.name for s in STOP_SIGNALS)}, comma-separated, or none)"
            )
        found.append(sig)
    return tuple(dict.fromkeys(found))


@contextlib.contextmanager
def exiting_on(signals: tuple[signal.Signals, ...]):
    """For the body, ``signals`` end the process at once, as their default action would, but by raising
    ``SystemExit(128 + n)``: ``finally`` blocks run, so the run lock is released (a requeued job on another host
    would find it and stop). Training replaces these handlers with ``SaveAndStopOnSignal.listening``'s."""

    def stop(signum, frame):
        logger.warning("%s outside training: stopping (no step to save)", signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_then_init(signals: tuple[signal.Signals, ...], init_fn, worker_id: int) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
    if init_fn is not None:
        init_fn(worker_id)


def workers_ignoring(signals: tuple[signal.Signals, ...], init_fn=None):
    """A DataLoader ``worker_init_fn`` that makes its worker ignore ``signals``, then runs ``init_fn``.

    A scheduler signals every process of the job, the data workers too, and torch's workers die on SIGTERM (their
    C handler): the training process would then fail on its next batch ("DataLoader worker ... is killed by signal:
    Terminated") before its checkpoint is written. The training process alone decides when its workers stop."""
    return functools.partial(_ignore_then_init, tuple(signals), init_fn) if signals else init_fn


class RecordsSignal:
    """Records the first of ``signals`` received while ``listening``: a handler that only notes the signal (a later
    one changes nothing), so that the work in progress (a training step, an evaluation batch) goes on undisturbed and
    every process can agree on a stop at a point they all reach."""

    def __init__(self, signals: tuple[signal.Signals, ...], on_receipt: str):
        self.signals = tuple(signals)
        self.on_receipt = on_receipt  # what the log says will happen
        self.received: signal.Signals | None = None

    def _record(self, signum, frame):
        # A handler runs between two bytecodes of the main thread: it only records, the work goes on undisturbed.
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning("%s received: %s", self.received.name, self.on_receipt)

    @contextlib.contextmanager
    def listening(self):
        """The handlers installed for the body, the previous ones restored after it."""
        previous = {sig: signal.signal(sig, self._record) for sig in self.signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class SaveAndStopOnSignal(RecordsSignal, TrainerCallback):
    """Records the first of ``signals`` received during training; at the end of the step in progress, once every
    process has been asked (``gather``), makes the Trainer save a checkpoint and stop.

    ``gather(tensor_1)`` returns every process's value (accelerate's ``Accelerator.gather``); the agreed value is
    the largest, so a signal seen by one process stops them all at the same step. ``stopped_by`` and
    ``stopped_at_step`` say afterwards whether, and where, training stopped on a signal."""

    def __init__(self, signals: tuple[signal.Signals, ...], gather, device: torch.device | str = "cpu"):
        super().__init__(signals, "the run saves a checkpoint at the end of this step and stops")
        self.gather = gather
        self.device = device
        self.stopped_by: signal.Signals | None = None
        self.stopped_at_step: int | None = None

    def agreed_signal(self) -> signal.Signals | None:
        """The signal any process received so far (the largest number if several), or None; a collective."""
        mine = torch.tensor([int(self.received or 0)], device=self.device)
        agreed = int(self.gather(mine).max().item())
        return signal.Signals(agreed) if agreed else None

    def on_step_end(self, args, state, control, **kwargs):
        if not self.signals or self.stopped_by is not None:
            return
        agreed = self.agreed_signal()
        if agreed is None:
            return
        if state.global_step >= state.max_steps:
            # The last step: the run is finished. Its checkpoint first, then the export, as it would have been.
            control.should_save = True
            logger.warning("%s in the last step: saving checkpoint-%d, then the export", agreed.name,
                           state.global_step)
            return
        self.stopped_by, self.stopped_at_step = agreed, state.global_step
        control.should_save = True
        control.should_training_stop = True
        logger.warning("%s: saving checkpoint-%d, then stopping", agreed.name, state.global_step)


class StoppedBySignal(Exception):
    """Training stopped on a signal after saving a checkpoint: the message names it and how to resume."""

    def __init__(self, stop: SaveAndStopOnSignal, output_dir: str, reports: bool = True):
        self.exit_code = 128 + int(stop.stopped_by)
        self.reports = reports  # every process stops; one per node says so (its launch script's exit status)
        super().__init__(
            f"stopped by {stop.stopped_by.name} after step {stop.stopped_at_step}, which is saved as "
            f"{output_dir}/checkpoint-{stop.stopped_at_step}; the model is not exported (the run is not finished). "
            f"Continue with the same command and --resume_from_checkpoint True"
        )
