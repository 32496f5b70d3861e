"""Run finetune.main in a subprocess that SIGKILLs itself at a chosen point (tests/test_checkpoints.py).

    FAULT=<point>:<step> python tests/fault_driver.py <finetune arguments>

Points: mid_step (inside training step <step>), mid_save (checkpoint <step>: the Trainer's files are written,
SC-Tune's are not), mid_commit (checkpoint <step> verified, being hashed, not yet marked complete),
before_rotate (checkpoint <step> renamed into place, older ones not yet rotated), mid_export (training done, the
final model written into the export's staging folder, not yet swapped in; <step> is ignored). And one that is not
a kill: term_group (inside training step <step>, SIGTERM to the driver's process group, its data workers included,
as a scheduler sends it) and term_loading (SIGTERM while the model loads).
"""

import itertools
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import finetune  # noqa: E402
from sc_tune import checkpoints, export  # noqa: E402
from sc_tune.cycle import RolloutCycle  # noqa: E402
from sc_tune.process_exit import run_command  # noqa: E402
from sc_tune.resume import RunState  # noqa: E402


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in(owner, name, when):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if when(*args):
            die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


point, step = os.environ["FAULT"].split(":")
step = int(step)
if point == "mid_step":
    begun = itertools.count(1)  # a fresh run: the cycle's n-th begin_step is in step n, after its data is drawn
    kill_in(RolloutCycle, "begin_step", lambda self, position: next(begun) == step)
elif point == "term_group":
    begun = itertools.count(1)
    begin_step = RolloutCycle.begin_step

    def begin_then_term(self, position):
        if next(begun) == step:
            os.killpg(os.getpgrp(), signal.SIGTERM)  # the handlers only record it: the step goes on
        return begin_step(self, position)

    RolloutCycle.begin_step = begin_then_term
elif point == "term_loading":  # SIGTERM to itself while the model loads (before training; <step> is ignored)
    load = finetune.load_model_and_adapter

    def term_then_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*args, **kwargs)

    finetune.load_model_and_adapter = term_then_load
elif point == "mid_save":
    kill_in(RunState, "save", lambda self, checkpoint, next_step: next_step == step)
elif point == "mid_commit":
    kill_in(checkpoints, "_hash_files", lambda folder, *a: folder.endswith(f"checkpoint-{step}"))
elif point == "before_rotate":
    kill_in(checkpoints, "rotate", lambda run_dir, limit, protected: any(
        p and p.endswith(f"checkpoint-{step}") for p in protected))
elif point == "mid_export":  # the new export written whole into its staging folder, not yet swapped in
    kill_in(export, "commit_export", lambda output_dir: True)
else:
    raise SystemExit(f"unknown fault point {point}")
# As `python finetune.py` runs it: in a launch, the exit without the interpreter's teardown (sc_tune.process_exit)
run_command(lambda: finetune.cli(sys.argv[1:]))
