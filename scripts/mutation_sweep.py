"""Break a module on purpose, one small change at a time, and see which changes its tests let through.

    python scripts/mutation_sweep.py sc_tune/ppo.py tests/test_ppo.py tests/test_describer_update.py
    python scripts/mutation_sweep.py sc_tune/boxes.py tests/test_boxes.py --list          # the changes, no runs
    python scripts/mutation_sweep.py sc_tune/boxes.py tests/test_boxes.py --only 3,17     # these changes only

Each change ("mutant") is one of: an arithmetic operator swapped (``+``/``-``, ``*``/``/``), a comparison loosened,
tightened or negated (``<``/``<=``, ``==``/``!=``, ``in``/``not in``, ``is``/``is not``), ``and``/``or`` swapped, a
``-x`` or ``not x`` dropped, ``min``/``max`` swapped, a number moved by one, a ``True``/``False`` flipped. For each,
the named tests run (``-x -m "not slow"`` unless ``--pytest_args`` says otherwise) in a copy of the repository's
tracked files, so the working tree is never touched, even when a sweep is interrupted (Ctrl-C or SIGTERM delete the
copy). A mutant the tests let through ("SURVIVED") is either a gap in the tests or a change that cannot alter
behaviour (a default argument every caller passes, a guard that is unreachable): read each one. One JSON line per
mutant goes to stdout, then a summary.

The tests named are the only ones run per mutant, so a survivor may still be caught by a test elsewhere: rerun the
survivors (``--only``) with a wider selection before calling one a gap.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWAPPED_OPERATOR = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
                    ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}
SWAPPED_COMPARISON = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                      ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def mutants(tree: ast.AST) -> list[tuple[int, int, str, int]]:
    """Every change this sweep makes: (node's index in ``ast.walk`` order, comparison index, description, line)."""
    docstrings = _docstrings(tree)
    found = []

    def add(index, node, change, k=0):
        found.append((index, k, change, node.lineno))

    for index, node in enumerate(ast.walk(tree)):
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAPPED_OPERATOR:
            add(index, node, f"{type(node.op).__name__} -> {SWAPPED_OPERATOR[type(node.op)].__name__}")
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in SWAPPED_COMPARISON:
                    add(index, node, f"{type(op).__name__} -> {SWAPPED_COMPARISON[type(op)].__name__}", k)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            add(index, node, f"{type(node.op).__name__} dropped")
        elif isinstance(node, ast.BoolOp):
            add(index, node, f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            add(index, node, f"{node.func.id} -> {'max' if node.func.id == 'min' else 'min'}")
        elif isinstance(node, ast.Constant) and id(node) not in docstrings:
            if isinstance(node.value, bool):
                add(index, node, f"{node.value} -> {not node.value}")
            elif isinstance(node.value, (int, float)):
                add(index, node, f"{node.value!r} -> {node.value + 1!r}")
    return found


def mutated(tree: ast.AST, mutant: tuple[int, int, str, int]) -> ast.AST:
    """A copy of ``tree`` with one change made."""
    tree = copy.deepcopy(tree)
    index, k, _, _ = mutant
    parents = {id(child): parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == index)
    if isinstance(node, (ast.BinOp, ast.AugAssign)):
        node.op = SWAPPED_OPERATOR[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops[k] = SWAPPED_COMPARISON[type(node.ops[k])]()
    elif isinstance(node, ast.UnaryOp):
        parent = parents[id(node)]
        for field, value in ast.iter_fields(parent):  # put the operand where the operation was
            if value is node:
                setattr(parent, field, node.operand)
            elif isinstance(value, list):
                setattr(parent, field, [node.operand if v is node else v for v in value])
    elif isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif isinstance(node, ast.Call):
        node.func.id = "max" if node.func.id == "min" else "min"
    else:
        node.value = (not node.value) if isinstance(node.value, bool) else node.value + 1
    return ast.fix_missing_locations(tree)


def copy_of_the_repository(destination: str) -> None:
    """The tracked files (what a fresh clone has), and the released files the tests read where they are fetched."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, name))
    fetched = os.path.join(ROOT, ".cache", "real_checkpoints")
    if os.path.isdir(fetched):
        os.makedirs(os.path.join(destination, ".cache"), exist_ok=True)
        os.symlink(fetched, os.path.join(destination, ".cache", "real_checkpoints"))


def kill_what_runs_in(folder: str) -> None:
    """SIGKILL to every process whose working directory is inside ``folder`` (read in /proc; Linux). ``subprocess.run``
    kills the tests it waits for when SIGTERM unwinds it, but not a child whose start the signal interrupted (forked,
    its pid not yet handed back): that one ran on in the deleted copy."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if int(pid) != os.getpid() and (cwd == folder or cwd.startswith(folder + os.sep)):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue  # ended meanwhile, or not ours to read


def address_space_limit(max_bytes: int):
    """A ``preexec_fn`` capping the tests' address space: a mutant that makes them allocate without end (a loop that
    appends forever: two in ``reference_flags.py`` took 21 GB of a 24 GB machine in under three minutes) ends in a
    MemoryError, counted as caught, before it takes the machine's memory and whatever else runs there."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))

    return limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the file to break, relative to the repository root (sc_tune/ppo.py)")
    parser.add_argument("tests", nargs="*", help="the test files (or node ids) to run against each mutant")
    parser.add_argument("--only", default="", help="comma-separated mutant numbers (from --list or a sweep)")
    parser.add_argument("--list", action="store_true", help="print the mutants and run nothing")
    parser.add_argument("--pytest_args", default='-x -q -p no:cacheprovider -m "not slow"')
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant (a timeout counts as caught)")
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    parser.add_argument("--max_memory_gb", type=float, default=round(physical / 2**30 / 2, 1),
                        help="address space of the tests' processes (default: half of this machine's memory); past "
                             "it a mutant's tests fail with MemoryError, counted as caught")
    args = parser.parse_args(argv)

    source_path = os.path.join(ROOT, args.module)
    with open(source_path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source, filename=args.module)
    lines = source.splitlines()
    chosen = {int(n) for n in args.only.split(",") if n.strip()}
    todo = [(n, m) for n, m in enumerate(mutants(tree)) if not chosen or n in chosen]
    if args.list:
        for n, (_, _, change, line) in todo:
            print(json.dumps({"mutant": n, "line": line, "change": change, "code": lines[line - 1].strip()}))
        return 0
    if not args.tests:
        parser.error("name the tests to run against each mutant")

    counts = {"caught": 0, "SURVIVED": 0}
    # A sweep stopped with SIGTERM (kill, a scheduler) unwinds like Ctrl-C: the running tests are killed and the copy
    # of the repository is deleted (a plain SIGTERM would leave both behind).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="mutation_sweep_") as work:
        try:
            copy_of_the_repository(work)
            env = dict(os.environ, PYTHONPATH=work, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            command = [sys.executable, "-m", "pytest", *shlex.split(args.pytest_args), *args.tests]
            limited = address_space_limit(int(args.max_memory_gb * 2**30))
            # The unchanged module, as the sweep writes it (ast.unparse drops comments): its tests must pass first.
            target = os.path.join(work, args.module)
            with open(target, "w", encoding="utf-8") as f:
                f.write(ast.unparse(tree))
            baseline = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout,
                                      preexec_fn=limited)
            if baseline.returncode != 0:
                print(f"the tests fail on the unchanged module; nothing swept:\n{baseline.stdout[-3000:]}",
                      file=sys.stderr)
                return 2
            for n, mutant in todo:
                line = mutant[3]
                with open(target, "w", encoding="utf-8") as f:
                    f.write(ast.unparse(mutated(tree, mutant)))
                start = time.monotonic()
                try:
                    run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                                         timeout=args.timeout, preexec_fn=limited)
                    status = "caught" if run.returncode != 0 else "SURVIVED"
                except subprocess.TimeoutExpired:
                    status = "caught"  # a mutant that hangs the tests is one they notice
                counts[status] += 1
                print(json.dumps({"mutant": n, "line": line, "change": mutant[2], "status": status,
                                  "seconds": round(time.monotonic() - start, 1), "code": lines[line - 1].strip()}),
                      flush=True)
        finally:
            kill_what_runs_in(work)  # nothing runs on in the copy about to be deleted
    print(json.dumps({"module": args.module, "mutants": len(todo), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
