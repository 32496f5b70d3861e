"""Run finetune.py's or evaluate.py's command on several argument lists in one process, each as
``python <script> ...`` would run it (tests/test_model_folder_errors.py): one interpreter start and one torch import
for them all, about 6 s each otherwise.

    python tests/cli_driver.py finetune.py CASES.json

CASES.json maps a case name to its argument list; the last line of stdout maps each case to its ``returncode`` and
its ``stderr`` (everything written to file descriptor 2 while it ran: Python's, the logging handlers' and C code's).
"""

import contextlib
import importlib
import json
import os
import sys
import tempfile
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def stderr_into(path):
    """File descriptor 2 written to ``path`` for the body (a logging handler made in an earlier case still writes
    to fd 2 through its stream, so its lines land in this case's file)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as target:
        os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def fresh_warnings() -> None:
    """Warnings shown once per process (Python's registry, transformers' ``warning_once``) shown again, as each case's
    own process would show them."""
    import logging

    warnings.onceregistry.clear()
    for module in list(sys.modules.values()):
        registry = vars(module).get("__warningregistry__") if hasattr(module, "__dict__") else None
        if isinstance(registry, dict):
            registry.clear()
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()


def run(script: str, command, argv) -> int:
    """The exit status ``python <script> argv`` would have: SystemExit's message printed to stderr with status 1, an
    uncaught exception's traceback printed with status 1. ``sys.argv`` is the script's (argparse's messages and the
    run lock name it)."""
    fresh_warnings()
    saved, sys.argv = sys.argv, [script, *argv]
    try:
        command(argv)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 (what the interpreter would do with it)
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved
    return 0


def main(script: str, cases_file: str) -> None:
    command = importlib.import_module(script.removesuffix(".py")).cli
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for case, argv in cases.items():
            captured = os.path.join(scratch, "stderr")
            with stderr_into(captured):
                code = run(script, command, argv)
            with open(captured, encoding="utf-8", errors="replace") as f:
                results[case] = {"returncode": code, "stderr": f.read()}
    sys.stdout.flush()
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
