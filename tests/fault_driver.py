"""Run finetune.main in a subprocess that SIGKILLs itself at a chosen point (tests/test_checkpoints.py).

    FAULT=<point>:<step> python tests/fault_driver.py <finetune arguments>

Points: mid_step (inside training step <step>), mid_save (checkpoint <step>: the Trainer's files are written,
SC-Tune's are not), mid_commit (checkpoint <step> verified, being hashed, not yet marked complete),
before_rotate (checkpoint <step> renamed into place, older ones not yet rotated).
"""

import itertools
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import finetune  # noqa: E402
from sc_tune import checkpoints  # noqa: E402
from sc_tune.cycle import RolloutCycle  # noqa: E402
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
    begun = itertools.count()  # a fresh run: the cycle's n-th begin_step is in step n, after its data is drawn
    kill_in(RolloutCycle, "begin_step", lambda self, position: next(begun) == step)
elif point == "mid_save":
    kill_in(RunState, "save", lambda self, checkpoint, next_step: next_step == step)
elif point == "mid_commit":
    kill_in(checkpoints, "_hash_files", lambda folder, *a: folder.endswith(f"checkpoint-{step}"))
elif point == "before_rotate":
    kill_in(checkpoints, "rotate", lambda run_dir, limit, protected: any(
        p and p.endswith(f"checkpoint-{step}") for p in protected))
else:
    raise SystemExit(f"unknown fault point {point}")
finetune.main(sys.argv[1:])
