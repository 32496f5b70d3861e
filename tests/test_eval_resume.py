"""Evaluation work is never lost (issue 19, item 8): rows written as they are scored, an interrupted evaluation
resumed without re-scoring, a finished one never replaced without --overwrite_results, --max_samples 0 refused."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
from PIL import Image

import sc_tune.evaluation.self_consistency as self_consistency
from sc_tune.arguments import ArgumentError
from sc_tune.evaluation.progress import ResultsError
from sc_tune.tiny import save_tiny

BOXES = [[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.9, 0.9], [0.0, 0.0, 0.5, 1.0], [0.5, 0.5, 1, 1]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_resume")
    Image.new("RGB", (80, 60), (200, 40, 40)).save(root / "red.png")
    Image.new("RGB", (64, 64), (40, 40, 200)).save(root / "blue.png")
    data = root / "held_out.json"
    data.write_text(json.dumps([{"image": "red.png" if i % 2 else "blue.png", "bbox": b} for i, b in enumerate(BOXES)]))
    return root, save_tiny(root / "model", "qwen2_vl"), data


def run(setup, out, *extra):
    import evaluate

    root, model, data = setup
    evaluate.main(["--task", "self-consistency", "--model_name_or_path", model, "--data_path", str(data),
                   "--image_folder", str(root), "--output_dir", str(out), "--per_device_eval_batch_size", "2",
                   "--grid_samples", "0", "--describer_max_new_tokens", "4", "--locator_max_new_tokens", "4",
                   "--no_fit_locator_budget", *extra])
    return [json.loads(line) for line in (out / "self_consistency_samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """The rows of one uninterrupted evaluation: what every interrupted-and-resumed one must end with."""
    return run(setup, tmp_path_factory.mktemp("uninterrupted"))


class CountingCycle:
    """``self_consistency.cycle`` (one batch) as the evaluator calls it, counting the boxes scored; raises on call
    ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.boxes, self.fail_at = 0, [], fail_at
        self.original = self_consistency.cycle

    def __call__(self, model, locator, adapter, images, true_boxes, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed mid-evaluation")
        self.boxes += true_boxes
        return self.original(model, locator, adapter, images, true_boxes, *args, **kwargs)


KILLED = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import evaluate
import sc_tune.evaluation.self_consistency as self_consistency
original, calls = self_consistency.cycle, []
def cycle(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        # SIGKILL: no exit handler, no buffer flushed, only what is on disk survives; SIGTERM: a scheduler's stop,
        # sent twice (the scheduler's and torchrun's): the batch in progress is finished and kept, then the stop
        for _ in range(1 if os.environ["KILL_WITH"] == "SIGKILL" else 2):
            os.kill(os.getpid(), getattr(signal, os.environ["KILL_WITH"]))
    return original(*args, **kwargs)
self_consistency.cycle = cycle
if os.environ.get("KILL_AT") == "loading":  # before scoring: exiting_on's immediate stop
    load = evaluate.load_model_and_adapter
    def load_model_and_adapter(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*args, **kwargs)
    evaluate.load_model_and_adapter = load_model_and_adapter
from sc_tune.process_exit import run_command
run_command(lambda: evaluate.cli(sys.argv[2:]))  # as `python evaluate.py` runs it
"""


@pytest.mark.parametrize("kill_with", ["SIGKILL", "SIGTERM"])
def test_an_interrupted_evaluation_keeps_its_rows_and_resumes_without_rescoring(setup, uninterrupted, tmp_path,
                                                                               monkeypatch, kill_with):
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "interrupted"
    root, model, data = setup
    argv = ["--task", "self-consistency", "--model_name_or_path", model, "--data_path", str(data), "--image_folder",
            str(root), "--output_dir", str(out), "--per_device_eval_batch_size", "2", "--grid_samples", "0",
            "--describer_max_new_tokens", "4", "--locator_max_new_tokens", "4", "--no_fit_locator_budget"]
    killed = subprocess.run([sys.executable, "-c", KILLED, ROOT, *argv], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "KILL_WITH": kill_with})
    partial = out / "self_consistency_samples.partial"
    if kill_with == "SIGKILL":
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        scored = 2  # the first batch was on disk before the second started
    else:  # the status SIGTERM gives, and the run lock released (a rerun on another host would stop at it)
        assert killed.returncode == 128 + signal.SIGTERM, killed.stderr[-2000:]
        assert not (out / "sc_tune_run.lock").exists()
        scored = 4  # the batch in progress is finished, kept, and named in the stop line (scripts/env.sh reads it)
        assert (f"evaluate.py: stopped by SIGTERM after 4 scored rows (4 of 5 samples, kept in {partial}); the same "
                "command scores the rest") in killed.stderr.splitlines(), killed.stderr[-2000:]
        assert "Traceback" not in killed.stderr
    kept = [json.loads(line) for line in (partial / "rank0.jsonl").read_text().splitlines()]
    assert [row["index"] for row in kept] == list(range(scored))
    assert not (out / "self_consistency_metrics.json").exists()
    second = CountingCycle()
    monkeypatch.setattr(self_consistency, "cycle", second)
    resumed = run(setup, out)
    assert second.boxes == BOXES[scored:]  # only what was not scored yet
    assert resumed == uninterrupted  # the same rows as one uninterrupted evaluation
    metrics = json.loads((out / "self_consistency_metrics.json").read_text())["metrics"]
    assert metrics["num_samples"] == 5 and metrics["num_resumed"] == scored
    assert not partial.exists()


def test_a_sigterm_while_the_model_loads_ends_the_evaluation_at_once_with_its_lock_released(setup, tmp_path):
    """Before scoring there is no batch to finish: the signal's status at once (exiting_on), the run lock released,
    nothing scored, no stop line."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    root, model, data = setup
    out = tmp_path / "loading"
    argv = ["--task", "self-consistency", "--model_name_or_path", model, "--data_path", str(data), "--image_folder",
            str(root), "--output_dir", str(out), "--grid_samples", "0"]
    killed = subprocess.run([sys.executable, "-c", KILLED, ROOT, *argv], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "KILL_WITH": "SIGTERM", "KILL_AT": "loading"})
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert "SIGTERM outside training: stopping" in killed.stderr and "stopped by" not in killed.stderr
    assert not (out / "sc_tune_run.lock").exists() and not (out / "self_consistency_samples.partial").exists()


def test_a_row_cut_off_by_a_kill_is_scored_again(setup, tmp_path, monkeypatch, caplog):
    out = tmp_path / "torn"
    monkeypatch.setattr(self_consistency, "cycle", CountingCycle(fail_at=2))
    with pytest.raises(KeyboardInterrupt):
        run(setup, out)
    rows = out / "self_consistency_samples.partial" / "rank0.jsonl"
    lines = rows.read_text().splitlines()
    rows.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # the kill hit mid-line
    again = CountingCycle()
    monkeypatch.setattr(self_consistency, "cycle", again)
    with caplog.at_level(logging.WARNING):
        run(setup, out)
    assert "line 2 is incomplete" in caplog.text
    assert again.boxes == BOXES[1:]


def test_rows_of_other_settings_are_never_mixed_in(setup, tmp_path, monkeypatch):
    out = tmp_path / "mixed"
    monkeypatch.setattr(self_consistency, "cycle", CountingCycle(fail_at=2))
    with pytest.raises(KeyboardInterrupt):
        run(setup, out)
    monkeypatch.setattr(self_consistency, "cycle", CountingCycle())
    with pytest.raises(ResultsError, match=r"scored with other settings \(describer differ\).*--overwrite_results"):
        run(setup, out, "--describer_max_new_tokens", "5")
    with pytest.raises(ResultsError, match=r"scored with other settings \(image_pixels differ\)"):
        run(setup, out, "--image_max_pixels", "3136")  # the tiny processor's own bound: same images, other settings
    with pytest.raises(ResultsError, match=r"records differ"):
        run(setup, out, "--max_samples", "4")
    template = os.path.join(setup[1], "chat_template.jinja")  # edited in place: the rest would be scored otherwise
    original = open(template).read()
    try:
        with open(template, "a") as f:
            f.write("{#- an edit #}")
        with pytest.raises(ResultsError, match=r"scored with other settings \(model differ\)"):
            run(setup, out)
    finally:
        with open(template, "w") as f:
            f.write(original)
    assert len(run(setup, out, "--overwrite_results", "True", "--max_samples", "4")) == 4


def test_a_finished_evaluation_is_not_replaced_without_the_flag(setup, tmp_path):
    out = tmp_path / "done"
    run(setup, out)
    before = (out / "self_consistency_metrics.json").read_bytes()
    with pytest.raises(ResultsError, match=r"self_consistency_metrics\.json holds a finished evaluation.*"
                                           r"--overwrite_results True"):
        run(setup, out, "--max_samples", "2")
    assert (out / "self_consistency_metrics.json").read_bytes() == before
    assert len(run(setup, out, "--max_samples", "2", "--overwrite_results", "True")) == 2
    assert json.loads((out / "self_consistency_metrics.json").read_text())["metrics"]["num_samples"] == 2


@pytest.mark.parametrize("flag, value", [("--max_samples", "0"), ("--max_samples", "-3"),
                                         ("--per_device_eval_batch_size", "0"), ("--describer_min_new_tokens", "99")])
def test_settings_that_score_nothing_are_refused(setup, tmp_path, flag, value):
    with pytest.raises(ArgumentError, match=rf"{flag} {value} must"):
        run(setup, tmp_path / "none", flag, value)
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- interrupted twice, killed while writing metrics
def partial_lines(out):
    return (out / "self_consistency_samples.partial" / "rank0.jsonl").read_bytes().split(b"\n")


def test_a_resumed_evaluation_never_appends_onto_a_cut_off_row(setup, tmp_path, monkeypatch):
    out = tmp_path / "torn_twice"
    monkeypatch.setattr(self_consistency, "cycle", CountingCycle(fail_at=2))
    with pytest.raises(KeyboardInterrupt):
        run(setup, out)
    rows = out / "self_consistency_samples.partial" / "rank0.jsonl"
    first, second = rows.read_bytes().splitlines()
    rows.write_bytes(first + b"\n" + second[: len(second) // 2])  # killed mid-row: row 0 whole, row 1 cut off
    monkeypatch.setattr(self_consistency, "cycle", CountingCycle(fail_at=2))
    with pytest.raises(KeyboardInterrupt):  # resumed, scores rows 1-2, then interrupted again
        run(setup, out)
    lines = partial_lines(out)
    assert lines[-1] == b"" and lines[0] == first  # whole lines only; the complete row kept as it was
    assert [json.loads(line)["index"] for line in lines[:-1]] == [0, 1, 2]
    last = CountingCycle()
    monkeypatch.setattr(self_consistency, "cycle", last)
    final = run(setup, out)
    assert last.boxes == BOXES[3:]  # rows 0-2 were all kept
    assert [row["index"] for row in final] == [0, 1, 2, 3, 4] and final[0] == json.loads(first)["row"]


def test_a_whole_last_row_without_its_newline_is_kept_and_a_cut_multibyte_character_is_no_traceback(tmp_path):
    from sc_tune.evaluation.distributed import Ranks
    from sc_tune.evaluation.progress import SampleLog

    log = SampleLog(str(tmp_path), "x", {"task": "t"}, Ranks())
    log.open()
    log.append([(0, {"caption": "é"}), (1, {"caption": "ü"})])
    log.close()
    path = tmp_path / "x_samples.partial" / "rank0.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])  # killed between a row and its newline: the row is whole
    log = SampleLog(str(tmp_path), "x", {"task": "t"}, Ranks())
    assert set(log.open()) == {0, 1}
    log.append([(2, {"caption": "a"})])
    log.close()
    assert path.read_bytes() == whole + b'{"index": 2, "row": {"caption": "a"}}\n'
    path.write_bytes(whole + '{"index": 2, "row": {"caption": "é'.encode()[:-1])  # cut inside "é"
    log = SampleLog(str(tmp_path), "x", {"task": "t"}, Ranks())
    assert set(log.open()) == {0, 1}
    log.close()
    assert path.read_bytes() == whole


@pytest.mark.parametrize("cut_bytes", [200_000, (1 << 16) - 1], ids=["longer than a scan block", "a block less one"])
@pytest.mark.parametrize("first", [True, False], ids=["the first row", "after a whole row"])
def test_a_cut_off_row_with_no_newline_near_the_end_is_cut_off_the_file(tmp_path, first, cut_bytes):
    """The cut-off tail is found by scanning back from the end in 64 KiB blocks: a file that is one cut-off row (a
    kill during the first write) has no newline at all, a long row (a long caption list) puts the last newline more
    than a block back, and a row one byte short of a block puts it at the first byte of the block read. Every whole
    row before it is kept."""
    from sc_tune.evaluation.distributed import Ranks
    from sc_tune.evaluation.progress import SampleLog

    log = SampleLog(str(tmp_path), "x", {"task": "t"}, Ranks())
    log.open()
    if not first:
        log.append([(0, {"caption": "a" * 70_000})])  # longer than a block: the block before holds no newline
    log.close()
    path = tmp_path / "x_samples.partial" / "rank0.jsonl"
    whole = path.read_bytes()
    cut_row = b'{"index": 1, "row": {"caption": "' + b"x" * cut_bytes
    path.write_bytes(whole + cut_row[:cut_bytes])
    log = SampleLog(str(tmp_path), "x", {"task": "t"}, Ranks())
    assert set(log.open()) == ({0} if whole else set())
    log.close()
    assert path.read_bytes() == whole


class _DumpKilledMidWrite:
    """``json`` as sc_tune.jsonio sees it, whose ``dump`` writes half the file and then is killed; ``on_disk``: the
    watched file's bytes at that instant (None: absent), what a SIGKILL there would leave."""

    def __init__(self, watched):
        self.watched, self.on_disk = watched, "not written"

    def __getattr__(self, name):
        return getattr(json, name)

    def dump(self, value, f, **kwargs):
        if not f.name.startswith(str(self.watched)):  # another file (the partial rows' settings): written as usual
            return json.dump(value, f, **kwargs)
        text = json.dumps(value, **kwargs)
        f.write(text[: len(text) // 2])
        f.flush()
        self.on_disk = self.watched.read_bytes() if self.watched.exists() else None
        raise KeyboardInterrupt("killed while writing the metrics")


def test_a_kill_while_writing_the_metrics_leaves_no_finished_looking_file(setup, tmp_path, monkeypatch):
    import sc_tune.jsonio as jsonio

    out = tmp_path / "metrics_cut"
    killed = _DumpKilledMidWrite(out / "self_consistency_metrics.json")
    monkeypatch.setattr(jsonio, "json", killed)
    with pytest.raises(KeyboardInterrupt):
        run(setup, out)
    monkeypatch.undo()
    assert killed.on_disk is None  # written atomically: no half metrics file at any instant
    assert not (out / "self_consistency_metrics.json").exists()
    again = CountingCycle()
    monkeypatch.setattr(self_consistency, "cycle", again)
    assert len(run(setup, out)) == 5
    assert again.boxes == []  # every row was still in the partial folder: nothing scored twice
    assert json.loads((out / "self_consistency_metrics.json").read_text())["metrics"]["num_resumed"] == 5


def test_a_cut_off_metrics_file_beside_partial_rows_resumes_them(setup, tmp_path, monkeypatch, caplog):
    out = tmp_path / "half_metrics"
    monkeypatch.setattr(self_consistency, "cycle", CountingCycle(fail_at=2))
    with pytest.raises(KeyboardInterrupt):
        run(setup, out)
    metrics = out / "self_consistency_metrics.json"
    metrics.write_text('{\n  "task": "self-consis')  # an earlier version killed mid-write
    again = CountingCycle()
    monkeypatch.setattr(self_consistency, "cycle", again)
    with caplog.at_level(logging.WARNING):
        run(setup, out)
    assert f"{metrics} is not valid JSON" in caplog.text and "resuming" in caplog.text
    assert again.boxes == BOXES[2:]  # the two scored rows were kept, not discarded
    assert json.loads(metrics.read_text())["metrics"]["num_resumed"] == 2
    # No partial rows beside it: a finished evaluation whose metrics file was damaged later is still refused.
    metrics.write_text("{")
    with pytest.raises(ResultsError, match="holds a finished evaluation"):
        run(setup, out)


def test_a_cut_off_metrics_file_resumes_only_beside_its_own_tasks_rows(tmp_path):
    """REC keeps one partial folder per data file (``rec_<file>_samples.partial``): beside a cut-off rec_metrics.json
    they mean the run did not finish. Another task's partial rows in the same folder say nothing about this one."""
    from sc_tune.evaluation.progress import refuse_finished

    for task in ("rec", "self_consistency"):
        (tmp_path / f"{task}_metrics.json").write_text("{")
    (tmp_path / "rec_refcoco_val_samples.partial").mkdir()
    refuse_finished(str(tmp_path / "rec_metrics.json"), overwrite=False)  # resumes: no error
    with pytest.raises(ResultsError, match="self_consistency_metrics.json holds a finished evaluation"):
        refuse_finished(str(tmp_path / "self_consistency_metrics.json"), overwrite=False)
    (tmp_path / "self_consistency_samples.partial").mkdir()
    refuse_finished(str(tmp_path / "self_consistency_metrics.json"), overwrite=False)
    (tmp_path / "captions_samples.partial").mkdir()  # interrupted before it wrote metrics: nothing to refuse
    refuse_finished(str(tmp_path / "captions_metrics.json"), overwrite=False)


# ---------------------------------------------------------------- an image the family's processor refuses
def test_an_image_the_processor_refuses_is_found_before_scoring(setup, tmp_path, monkeypatch):
    root, model, _ = setup
    for name in ("red.png", "blue.png"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    Image.new("RGB", (4000, 8), (0, 200, 0)).save(tmp_path / "long.png")  # aspect ratio 500 > 200
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps([{"image": "long.png" if i == 2 else "red.png", "bbox": b}
                                for i, b in enumerate(BOXES)]))
    scored = CountingCycle()
    monkeypatch.setattr(self_consistency, "cycle", scored)
    with pytest.raises(SystemExit, match=r"held_out\.json: 1 sample\(s\) with an unreadable image .*record 2: "
                                         r"long\.png: image aspect ratio too extreme \(4000x8, > 200:1\)"):
        run((tmp_path, model, data), tmp_path / "out")
    assert scored.calls == 0
    rows = run((tmp_path, model, data), tmp_path / "out", "--skip_unreadable_images", "True")
    assert [row["index"] for row in rows] == [0, 1, 2, 3] and scored.boxes == BOXES[:2] + BOXES[3:]
    listed = json.loads((tmp_path / "out" / "self_consistency_metrics.json").read_text())["unreadable_images"]
    assert listed[str(data)]["samples"] == [{"record": 2, "image": "long.png",
                                             "reason": "image aspect ratio too extreme (4000x8, > 200:1)"}]


def test_the_metrics_file_records_what_the_scores_depend_on(setup, tmp_path):
    """Box format, pixel budget (when set) and whether the locator budget was fitted sit beside the metrics: the
    docs say to evaluate with the training run's settings, so the file must say which were used."""
    run(setup, tmp_path / "default")
    metrics = json.loads((tmp_path / "default" / "self_consistency_metrics.json").read_text())
    assert metrics["box_format"] == "native" and metrics["fit_locator_budget"] is False
    assert "image_pixels" not in metrics
    run(setup, tmp_path / "budget", "--image_max_pixels", "3136", "--box_format", "generic")
    metrics = json.loads((tmp_path / "budget" / "self_consistency_metrics.json").read_text())
    assert metrics["box_format"] == "generic" and metrics["image_pixels"] == [None, 3136]



def test_nodes_evaluating_other_samples_are_told_so_not_to_overwrite_their_results(tmp_path, monkeypatch):
    """Two emulated nodes, node 1 with MAX_SAMPLES=8 where node 0 had 16: node 1 read rank 0's fresh settings file and
    said its folder held "samples scored with other settings", to be discarded with --overwrite_results, and node 0
    failed on a closed connection. The ranks compare their settings first, and every one names the difference."""
    import torch.distributed as dist

    from sc_tune.evaluation.distributed import Ranks
    from sc_tune.evaluation.progress import SampleLog

    mine, node1 = {"task": "self-consistency", "records": "a" * 64}, {"task": "self-consistency", "records": "b" * 64}
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, view: out.__setitem__(
        slice(None), [view, ("node-b", node1)]))
    log = SampleLog(str(tmp_path), "self_consistency", mine, Ranks(0, 2))
    with pytest.raises(ResultsError, match=r"^the processes evaluate with different settings \(records differ: rank 1 "
                                           r"on node-b against rank 0 on \S+\): every node must run the same command"):
        log.open()
    assert not (tmp_path / "self_consistency_samples.partial").exists()  # nothing written
    node1 = mine  # the same settings on node-b: it opens
    reopened = SampleLog(str(tmp_path), "self_consistency", mine, Ranks(0, 2))
    assert reopened.open() == {}
    reopened.close()

@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-node"])
def test_evaluate_sh_on_two_nodes_needs_one_output_folder_they_share(setup, tmp_path, shared):
    """scripts/evaluate.sh as two nodes of one process each on this machine (NNODES=2). Every rank appends its rows
    to its own file in the output folder and reads the settings file rank 0 wrote there, so a node given its own
    folder failed after loading the model, on "No such file or directory: .../settings.json", where usage.md said the
    folder need not be shared. It is refused before the model loads, naming the folders; a shared one evaluates."""
    import subprocess

    from tests.conftest import ROOT
    from tests.helpers import free_port, kill_process_tree

    root, model, data = setup
    folders = [tmp_path / "eval", tmp_path / "eval" if shared else tmp_path / "node1" / "eval"]
    port = str(free_port())
    env = {**{k: v for k, v in os.environ.items() if k not in ("IMAGE_ROOT", "IMAGE_DIR")}, "TASK": "self-consistency",
           "MODEL": model, "DATA": str(data), "IMAGE_FOLDER": str(root), "NPROC": "1", "BATCH_SIZE": "2",
           "GRID_SAMPLES": "0", "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
           "EXTRA_ARGS": "--describer_max_new_tokens 4 --locator_max_new_tokens 6"}
    nodes = [subprocess.Popen(["sh", "scripts/evaluate.sh"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**env, "NODE_RANK": str(rank), "OUTPUT_DIR": str(folders[rank])})
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_process_tree(node.pid)  # the script, its torchrun and torchrun's rank
    if shared:
        assert [node.returncode for node in nodes] == [0, 0], outputs[1][-3000:]
        metrics = json.loads((folders[0] / "self_consistency_metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["metrics"]["num_samples"] == len(BOXES)
        return
    assert [node.returncode for node in nodes] == [1, 1], outputs[1][-3000:]
    for rank, output in enumerate(outputs):
        assert (f"evaluate.py: error: {folders[rank]} is not one folder for every process: rank 1 on "
                f"{socket.gethostname()} (given {folders[1]}) cannot see the run lock") in output, output[-3000:]
        assert "Loading weights" not in output  # refused before the model loads


SLOW_CYCLE = """
import sys
if sys.argv and sys.argv[0].endswith("evaluate.py"):  # evaluate.py's processes: 1 s per batch, time to signal one
    import time
    import sc_tune.evaluation.self_consistency as self_consistency
    original = self_consistency.cycle
    def cycle(*args, **kwargs):
        time.sleep(1)
        return original(*args, **kwargs)
    self_consistency.cycle = cycle
"""


@pytest.mark.slow
def test_two_nodes_stopped_mid_scoring_by_a_signal_to_node_0s_script_both_exit_with_its_status(setup, tmp_path):
    """scripts/evaluate.sh as two nodes of one process each (NNODES=2, a shared OUTPUT_DIR), SIGTERM to node 0's
    script alone while they score: node 0's process raised SystemExit(143) at once and node 1's script, whose shell
    and torchrun got no signal, failed on "Connection closed by peer" (exit 1). Now both stop after the same batch,
    their rows on disk, each node's script prints the stop line and exits 143; the same command (here one process)
    scores the rest, to the rows and metrics of an uninterrupted evaluation. 9 samples, batches of 1: node 0 holds 5
    batches, node 1 4 (unequal shards, no hang)."""
    import re
    import subprocess

    from tests.conftest import ROOT
    from tests.helpers import free_port
    from tests.test_distributed import _term_node_0_when

    root, model, _ = setup
    data = tmp_path / "nine.json"
    data.write_text(json.dumps([{"image": "red.png" if i % 2 else "blue.png", "bbox": BOXES[i % len(BOXES)]}
                                for i in range(9)]))
    nine = (root, model, data)
    reference = run(nine, tmp_path / "uninterrupted")
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW_CYCLE)
    out, port = tmp_path / "eval", str(free_port())
    env = {**{k: v for k, v in os.environ.items() if k not in ("IMAGE_ROOT", "IMAGE_DIR")}, "TASK": "self-consistency",
           "MODEL": model, "DATA": str(data), "IMAGE_FOLDER": str(root), "NPROC": "1", "BATCH_SIZE": "1",
           "GRID_SAMPLES": "0", "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
           "OUTPUT_DIR": str(out), "PYTHONPATH": f"{tmp_path / 'hook'}{os.pathsep}{ROOT}",
           "EXTRA_ARGS": "--describer_max_new_tokens 4 --locator_max_new_tokens 4 --no_fit_locator_budget"}
    logs, nodes = [tmp_path / f"node{rank}.log" for rank in (0, 1)], []
    for rank, log in enumerate(logs):
        with open(log, "w") as f:
            nodes.append(subprocess.Popen(["sh", "scripts/evaluate.sh"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                          env={**env, "NODE_RANK": str(rank)}, start_new_session=True))
    partial = out / "self_consistency_samples.partial"
    first_rows = partial / "rank0.jsonl"
    codes = _term_node_0_when(nodes, logs, lambda: first_rows.exists() and first_rows.read_text() != "", 120)  # scoring
    texts = [log.read_text() for log in logs]
    line = (r"^evaluate\.py: stopped by SIGTERM after (\d+) scored rows \(\1 of 9 samples, kept in "
            + re.escape(str(partial)) + r"\); the same command scores the rest$")
    stops = [re.findall(line, text, re.M) for text in texts]
    # each node's script: its own rank's line, then its own summary repeating it
    assert all(len(found) == 2 and len(set(found)) == 1 for found in stops), texts[1][-3000:]
    assert codes == [143, 143], texts[1][-3000:]
    assert "Connection closed by peer" not in texts[1] and "the run failed" not in texts[1]
    scored = int(stops[0][0])
    assert stops[1][0] == stops[0][0] and 2 <= scored < 9  # the same batch on both nodes, before the end
    kept = sorted(json.loads(row)["index"] for rank in (0, 1) for row in (partial / f"rank{rank}.jsonl").open())
    assert kept == list(range(scored))  # both ranks' rows up to the agreed batch, on disk
    assert not (out / "self_consistency_metrics.json").exists() and not (out / "sc_tune_run.lock").exists()
    assert run(nine, out) == reference  # the same command (one process here) scores the rest
    metrics = json.loads((out / "self_consistency_metrics.json").read_text())["metrics"]
    assert metrics == {**json.loads((tmp_path / "uninterrupted" / "self_consistency_metrics.json").read_text())[
        "metrics"], "num_resumed": scored}
