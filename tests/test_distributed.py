"""2-process runs on CPU (gloo): plain torchrun (DDP) and DeepSpeed ZeRO-2 / ZeRO-3 through finetune.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sc_tune.modeling import load_model_and_adapter
from tests.conftest import ROOT, SAMPLE_DATA, SAMPLE_IMAGES
from tests.helpers import kill_process_tree, run_launch

pytestmark = pytest.mark.slow


def _torchrun(checkpoint, output_dir, port, *extra):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        os.path.join(ROOT, "finetune.py"),
        "--model_name_or_path",
        checkpoint,
        "--data_path",
        SAMPLE_DATA,
        "--image_folder",
        SAMPLE_IMAGES,
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "5",
        "--describer_update_steps",
        "1",
        "--locator_update_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--describer_lr",
        "1e-3",
        "--locator_lr",
        "1e-3",
        "--use_cpu",
        "True",
        "--skip_preflight",
        "True",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--describer_max_new_tokens",
        "6",
        "--locator_max_new_tokens",
        "8",
        "--disable_tqdm",
        "True",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".torch_extensions")}
    result = run_launch(cmd, 600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    if "--preflight_min_accuracy" in extra:
        assert result.stdout.count("preflight on 16 samples") == 1  # it ran, and rank 0 reported
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    checkpoint = tiny_checkpoint("qwen2_vl")
    out = {}
    for port, (name, extra) in enumerate(
        [
            ("ddp", ["--ratio_threshold", "0.5"]),  # every describer update skipped: DDP must stay in step
            ("zero2", ["--deepspeed", os.path.join(ROOT, "scripts", "ds_config_zero2.json")]),
            # The preflight's generation under ZeRO-3 (weights gathered on every rank), with thresholds a random
            # model passes; greedy decoding draws no random numbers, so the run's losses stay those of ZeRO-2.
            ("zero3", ["--deepspeed", os.path.join(ROOT, "scripts", "ds_config_zero3.json"), "--skip_preflight",
                       "False", "--preflight_max_parse_failures", "1", "--preflight_min_accuracy", "0"]),
        ]
    ):
        directory = tmp_path_factory.mktemp(name)
        out[name] = (directory, _torchrun(checkpoint, directory, 29600 + port, *extra))
    return checkpoint, out


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_two_process_run_cycles_both_phases_and_exports(runs, name):
    checkpoint, out = runs
    directory, logs = out[name]
    assert [h["phase"] for h in logs] == ["describer", "describer", "locator", "locator", "describer"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    # The locator phase trained: the exported weights differ from the start...
    start, _ = load_model_and_adapter(checkpoint)
    trained, _ = load_model_and_adapter(str(directory))
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(start.named_parameters())[n])]
    assert any("language_model" in n for n in changed)
    assert not any(n.startswith("model.visual.blocks") for n in changed)  # fix_vit
    # ...and the snapshot was re-synced at the switch back: the first describer KL is zero again.
    assert abs(logs[4]["describer/kl"]) < 1e-5
    assert logs[2]["locator/loss"] > 0


def test_sharded_runs_agree_with_each_other(runs):
    _, out = runs
    losses = {name: [h["loss"] for h in logs] for name, (_, logs) in out.items()}
    assert losses["zero2"] == pytest.approx(losses["zero3"], rel=1e-4, abs=1e-6)
    assert losses["ddp"][2:4] == pytest.approx(losses["zero2"][2:4], rel=1e-4)  # same locator steps
    assert [h["describer/skipped"] for h in out["ddp"][1] if "describer/skipped" in h] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("stage", [2, 3])
def test_the_papers_model_trains_under_zero_and_keeps_its_fixed_positions(tiny_checkpoint, tmp_path, stage):
    """The native Qwen-VL-Chat (the paper's model), two processes under ZeRO-2 and ZeRO-3, full fine-tuning with
    fix_vit: both phases run, the export reloads with the resampler and the language model trained, the ViT and the
    resampler's fixed sin-cos table as they were (under ZeRO-2 the table, a frozen parameter then, came back trainable
    from from_pretrained and the run moved it; it is a persistent buffer now)."""
    checkpoint = tiny_checkpoint("qwen")
    out = tmp_path / f"zero{stage}_qwen"
    out.mkdir()
    config = os.path.join(ROOT, "scripts", f"ds_config_zero{stage}.json")
    logs = _torchrun(checkpoint, out, 29650 + stage, "--deepspeed", config)
    assert [h["phase"] for h in logs] == ["describer", "describer", "locator", "locator", "describer"]
    start, _ = load_model_and_adapter(checkpoint)
    trained, _ = load_model_and_adapter(str(out))
    before = dict(start.named_parameters())
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("transformer.visual.attn_pool.") for n in changed)
    assert any(n.startswith("transformer.h.") for n in changed)
    assert not any(n.startswith("transformer.visual.transformer.") for n in changed)  # fix_vit
    assert torch.equal(trained.transformer.visual.attn_pool.pos_embed, start.transformer.visual.attn_pool.pos_embed)


def test_finetune_ds_script_launches_with_environment_overrides(tiny_checkpoint, tmp_path):
    out = tmp_path / "ds_script"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "USE_CPU")},
        "GPUS_PER_NODE": "2",  # no MASTER_PORT: the script picks a free one; no --use_cpu: it adds that itself
        "MODEL": tiny_checkpoint("qwen2_vl"),
        "IMAGE_DIR": SAMPLE_IMAGES,
        "DATA": SAMPLE_DATA,
        "OUTPUT_DIR": str(out),
        "MAX_STEPS": "3",
        "BATCH_PER_GPU": "2",
        "DESCRIBER_UPDATE_STEPS": "1",
        "LOCATOR_UPDATE_STEPS": "1",
        "kl_coef": "0.02",  # the reference's lower-case name, still accepted
        "REPORT_TO": "none",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".torch_extensions"),
        "EXTRA_ARGS": "--bf16 False --gradient_checkpointing False --dataloader_num_workers 0 --skip_preflight True "
        "--describer_max_new_tokens 4 --locator_max_new_tokens 6 --disable_tqdm True",
    }
    result = run_launch(["sh", "scripts/finetune_ds.sh"], 600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-6000:]
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.kl_coef, args.describer_update_steps, args.max_steps, args.world_size) == (0.02, 1, 3, 2)
    assert args.deepspeed.endswith("ds_config_zero2.json")
    assert (out / "model.safetensors").exists()


def _long_run_env(checkpoint, out, **launch) -> dict:
    """scripts/finetune_ds.sh's environment for a CPU run of 200 steps (a signal stops it long before its end)."""
    return {
        **{k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "USE_CPU")},
        "MODEL": checkpoint, "IMAGE_FOLDER": SAMPLE_IMAGES, "DATA": SAMPLE_DATA,
        "OUTPUT_DIR": str(out), "MAX_STEPS": "200", "SAVE_STEPS": "100", "BATCH_PER_GPU": "2", "DS_CONFIG": "",
        "PRECISION": "fp32", "DESCRIBER_UPDATE_STEPS": "1", "LOCATOR_UPDATE_STEPS": "1", "REPORT_TO": "none",
        "OMP_NUM_THREADS": "1", "GRADIENT_CHECKPOINTING": "False", "STOP_GRACE": "120",
        "EXTRA_ARGS": "--skip_preflight True --describer_max_new_tokens 4 --locator_max_new_tokens 6 "
                      "--disable_tqdm True",
        **launch,
    }


@pytest.mark.parametrize("target, signal_name", [("process group", "SIGTERM"), ("torchrun", "SIGUSR1")])
def test_a_schedulers_signal_to_a_launch_saves_a_checkpoint_and_stops(tiny_checkpoint, tmp_path, target, signal_name):
    """scripts/finetune_ds.sh on two processes with data workers, signalled after its first step as a scheduler
    does: SIGTERM to the launch's process group (the shell, the pipeline's tee and torchrun; torchrun passes it to
    each process's own session, its data workers too, which torch's handler would end), or SIGUSR1 to torchrun
    alone (SLURM's --signal=USR1@N; torchrun must pass it on, not die of it). Every rank stops after the same step,
    which is saved and verified; nothing is exported; the script names the checkpoint."""
    import re
    import signal
    import time

    from sc_tune import checkpoints

    out = tmp_path / "run"
    env = _long_run_env(tiny_checkpoint("qwen2_vl"), out, GPUS_PER_NODE="2", DATALOADER_WORKERS="2")
    launch = subprocess.Popen(["sh", "scripts/finetune_ds.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        for line in launch.stdout:  # the first step's logged losses
            if "'loss'" in line or time.monotonic() > deadline:
                break
        sig = getattr(signal, signal_name)
        if target == "torchrun":
            torchrun = subprocess.check_output(["pgrep", "-s", str(launch.pid), "-f", "torch.distributed.run|torchrun"],
                                               text=True).split()
            assert len(torchrun) == 1, torchrun
            os.kill(int(torchrun[0]), sig)
        else:
            os.killpg(launch.pid, sig)
        rest, err = launch.communicate(timeout=300)
    finally:
        _killed_if_running([launch])  # the ranks too: torchrun gives each a session the launch's group misses
    stopped = re.search(rf"finetune\.py: stopped by {signal_name} after step (\d+), which is saved as (\S+);", err)
    # the launch's own exit code, recorded by the pipeline's left side, which a scheduler signals too
    assert stopped and re.search(r"SC-Tune: the run stopped on a signal \(exit code \d+\)", err), err[-3000:]
    step, saved = int(stopped.group(1)), stopped.group(2)
    assert saved == str(out / f"checkpoint-{step}") and step < 200
    assert checkpoints.problems(saved) == []
    assert "DataLoader worker" not in rest + err
    assert not (out / "model.safetensors").exists()
    assert launch.returncode == 128 + sig  # the script stops as the signal would have stopped it


def _two_nodes(checkpoint, tmp_path, out, **node1):
    """scripts/finetune_ds.sh as two nodes of one process each on this machine (NNODES=2, NODE_RANK 0 and 1,
    127.0.0.1, one free port), sharing the output folder ``out``; ``node1`` overrides node 1's variables. Each
    node's output goes to a file (an undrained pipe would stall the node that fills it): (processes, log paths)."""
    from tests.helpers import free_port

    port, nodes, logs = str(free_port()), [], [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    for rank, log in enumerate(logs):
        env = _long_run_env(checkpoint, out, GPUS_PER_NODE="1", DATALOADER_WORKERS="0", NNODES="2",
                            NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(node1 if rank else {}))
        with open(log, "w") as f:
            nodes.append(subprocess.Popen(["sh", "scripts/finetune_ds.sh"], cwd=ROOT, env=env, stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return nodes, logs


def _killed_if_running(nodes):
    """SIGKILL to each launch still running, its ranks included (``kill_process_tree``)."""
    for node in nodes:
        if node.poll() is None:
            kill_process_tree(node.pid)


def _term_node_0_when(nodes, logs, ready, timeout: float) -> list[int]:
    """Wait until ``ready()`` (the nodes are at work), then SIGTERM to node 0's script alone (`kill` of the script;
    Kubernetes) and wait for every node: their exit codes. Whatever happens, the launches still running are killed,
    their ranks included."""
    import signal
    import time

    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), logs[0].read_text()
            time.sleep(0.1)
        nodes[0].send_signal(signal.SIGTERM)
        return [node.wait(timeout=timeout) for node in nodes]
    finally:
        _killed_if_running(nodes)


def test_two_nodes_stopped_by_a_signal_to_node_0s_script_both_exit_with_its_status(tiny_checkpoint, tmp_path):
    """Two nodes emulated on this machine, SIGTERM to node 0's script alone: both stop after the same step, saved
    once, and node 1's script, whose shell and torchrun got no signal (its torchrun exits 1), exits 143 too, naming
    the checkpoint. The stop line came from global rank 0 alone, so node 1's script took the stop for a failure and
    exited 1: a job script or a scheduler's requeue logic on that node saw a crash."""
    import re

    from sc_tune import checkpoints

    out = tmp_path / "run"
    nodes, logs = _two_nodes(tiny_checkpoint("qwen2_vl"), tmp_path, out)
    # once both nodes have trained a step
    codes = _term_node_0_when(nodes, logs, lambda: all("'loss'" in log.read_text() for log in logs), 300)
    texts = [log.read_text() for log in logs]
    stops = [re.findall(r"^finetune\.py: stopped by SIGTERM after step (\d+), which is saved as (\S+);", text, re.M)
             for text in texts]
    # each node's script: its own rank's line, then its own summary repeating it
    assert all(len(found) == 2 and len(set(found)) == 1 for found in stops), texts[1][-3000:]
    assert stops[0][0] == stops[1][0]  # the same step, saved once
    step, saved = stops[0][0]
    assert saved == str(out / f"checkpoint-{step}") and int(step) < 200
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert checkpoints.problems(saved) == []
    assert not (out / "model.safetensors").exists()
    assert codes == [143, 143], texts[1][-3000:]


def test_a_node_started_with_other_steps_is_refused_before_training_not_left_hanging(tiny_checkpoint, tmp_path):
    """Node 1 with MAX_STEPS 7 where node 0 has 200: node 0 stopped at its last step while node 1 waited in a
    collective for the next, a hang with no output until --ddp_timeout (30 minutes). Both scripts now fail at once,
    naming the flag and each node's value, before any step."""
    nodes, logs = _two_nodes(tiny_checkpoint("qwen2_vl"), tmp_path, tmp_path / "run", MAX_STEPS="7")
    try:
        codes = [node.wait(timeout=120) for node in nodes]  # a hang fails here, not after 30 minutes
    finally:
        _killed_if_running(nodes)
    for log in logs:
        text = log.read_text()
        assert "SC-Tune: the run failed (exit code 1). The error reported by the processes:\nfinetune.py: error: the " \
               "processes were started with different settings: --max_steps: 200 on rank 0 on " in text, text[-3000:]
        assert "'loss'" not in text
    assert codes == [1, 1]


def test_finetune_ds_on_two_nodes_with_their_own_output_folders_is_refused_before_the_model_loads(tiny_checkpoint,
                                                                                                   tmp_path):
    """Every rank writes its part of each checkpoint into the output folder, so two nodes given folders of their own
    would fail at the first save, after save_steps of training. scripts/finetune_ds.sh as two nodes of one process on
    this machine, each with its own OUTPUT_DIR: both stop before the model loads, naming the folders."""
    import socket

    from tests.helpers import free_port

    folders = [tmp_path / "run", tmp_path / "node1_disk" / "run"]
    env = _long_run_env(tiny_checkpoint("qwen2_vl"), folders[0], GPUS_PER_NODE="1", NNODES="2", MAX_STEPS="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    nodes = [subprocess.Popen(["sh", "scripts/finetune_ds.sh"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env={**env, "NODE_RANK": str(rank), "OUTPUT_DIR": str(folders[rank])})
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=150)[0] for node in nodes]  # refused: ~25 s here
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_process_tree(node.pid)
    assert [node.returncode for node in nodes] == [1, 1], outputs[1][-3000:]
    for rank, output in enumerate(outputs):
        assert (f"finetune.py: error: {folders[rank]} is not one folder for every process: rank 1 on "
                f"{socket.gethostname()} (given {folders[1]}) cannot see the run lock") in output, output[-3000:]
        assert "Loading weights" not in output and "referring samples" not in output
    assert not (folders[0] / "sc_tune_run.lock").exists()  # rank 0's lock released
