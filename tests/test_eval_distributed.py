"""Sharding an evaluation across ranks (sc_tune/evaluation/distributed.py). In one process: the gather's order and its
refusal of a sample missing or scored twice, and which ranks a call shards over. Under torchrun, two CPU processes
(gloo): every sample of an odd-sized file is scored exactly once; these are marked ``slow`` (the project marker for
multi-process runs: ``pytest -m slow`` / ``-m "not slow"``), about 30 s on two cores.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from sc_tune.tiny import save_tiny
from tests.helpers import free_port, run_launch

REPO = Path(__file__).resolve().parents[1]
NUM_RECORDS = 7  # odd: rank 0 scores 4 samples, rank 1 scores 3; batch size 2 leaves a partial batch


# ------------------------------------------------------------------------------------------------ in one process
def test_the_gather_orders_this_ranks_results_and_a_resumed_runs_by_index():
    from sc_tune.evaluation.distributed import Ranks, gather_by_index

    assert gather_by_index([(2, "c"), (0, "a")], 3, Ranks(), known={1: "b"}) == ["a", "b", "c"]
    assert gather_by_index([], 2, Ranks(), known={1: "b", 0: "a"}) == ["a", "b"]  # all resumed
    assert gather_by_index([], 0, Ranks()) == []


def test_a_sample_missing_or_scored_twice_is_refused_naming_both_counts():
    """The denominator of every metric: a sharding bug must fail the run, not shrink or inflate it."""
    from sc_tune.evaluation.distributed import Ranks, gather_by_index

    scored = [(0, "a"), (13, "n"), (14, "o"), (14, "o")]  # 1..12 missing, 14 twice
    with pytest.raises(RuntimeError) as error:
        gather_by_index(scored, 15, Ranks(), known={13: "n"})  # 13 scored again after a resume
    assert str(error.value) == ("gathered 5 results for 15 samples (missing e.g. [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "
                                "duplicates: 2); every sample must be scored exactly once")
    with pytest.raises(RuntimeError, match=r"gathered 3 results for 2 samples \(missing e.g. \[\], duplicates: 0\)"):
        gather_by_index([(0, "a"), (1, "b"), (2, "c")], 2, Ranks())  # an index past the end


def test_without_a_process_group_a_call_shards_over_one_process_and_distributed_true_is_refused(monkeypatch):
    from sc_tune.evaluation.distributed import Ranks, current_ranks, init_from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == Ranks() and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() == Ranks() and not torch.distributed.is_initialized()
    assert current_ranks() == current_ranks(False) == Ranks(0, 1)
    with pytest.raises(RuntimeError, match="^distributed=True but torch.distributed is not initialised$"):
        current_ranks(True)


def test_a_process_group_of_one_is_followed_and_left_to_its_owner():
    """A script or notebook that evaluates in process may have started a process group of one: the evaluation shards
    over it as one process, and ``shutdown`` given those ranks leaves the group to whoever started it."""
    from sc_tune.evaluation.distributed import Ranks, current_ranks, shutdown

    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert current_ranks() == Ranks() and current_ranks(True) == Ranks(0, 1)
        shutdown(current_ranks())
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------- two ranks under torchrun
def torchrun(args, cwd, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), *args]
    result = run_launch(cmd, timeout, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_eval")
    images = root / "images"
    images.mkdir()
    for k in range(NUM_RECORDS):
        Image.new("RGB", (80 + 8 * k, 60), (30 * k, 100, 200 - 20 * k)).save(images / f"im{k}.png")
    model_dir = save_tiny(root / "model", "qwen2_vl")
    boxes = [[0.1 * k, 0.05, 0.3 + 0.1 * k, 0.5 + 0.05 * k] for k in range(NUM_RECORDS)]
    held_out = root / "held_out.json"
    held_out.write_text(json.dumps([{"image": f"im{k}.png", "bbox": b} for k, b in enumerate(boxes)]))
    rec = root / "rec.jsonl"
    rec.write_text("".join(json.dumps({"image": f"im{k}.png", "sent": f"the red circle {k}", "width": 80 + 8 * k,
                                       "height": 60, "bbox": [8 * k, 3, 40 + 8 * k, 30]}) + "\n"
                           for k in range(NUM_RECORDS)))
    regions = root / "regions.json"
    regions.write_text(json.dumps([{"image": f"im{k}.png", "bbox": b, "captions": ["the red circle", "a shape"]}
                                   for k, b in enumerate(boxes)]))
    return root, images, model_dir, held_out, rec, regions


@pytest.mark.slow
def test_launcher_self_consistency_two_processes(setup):
    root, images, model_dir, held_out, _, _ = setup
    out = root / "out_sc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MODEL": model_dir, "DATA": str(held_out),
           "IMAGE_ROOT": str(images), "OUTPUT_DIR": str(out), "NPROC": "2", "BATCH_SIZE": "2",
           "GRID_SAMPLES": "3", "MASTER_PORT": str(free_port())}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(["bash", str(REPO / "scripts" / "evaluate.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "self_consistency_metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["metrics"]["num_samples"] == metrics["metrics"]["num_records"] == NUM_RECORDS
    rows = [json.loads(line) for line in (out / "self_consistency_samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(NUM_RECORDS))
    assert [r["image"] for r in rows] == [f"im{k}.png" for k in range(NUM_RECORDS)]
    assert (out / "self_consistency_cycles.png").exists()


WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from sc_tune.evaluation import evaluate_rec, evaluate_region_captions, evaluate_self_consistency
    from sc_tune.evaluation.distributed import init_from_env, shutdown
    from sc_tune.evaluation.records import load_rec_samples, load_region_caption_records
    from sc_tune.adapters import adapter_class
    from transformers import AutoConfig, AutoModelForImageTextToText

    model_dir, images, rec, regions, out = sys.argv[1:]
    ranks = init_from_env()
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    adapter = adapter_class(AutoConfig.from_pretrained(model_dir).model_type).from_pretrained(model_dir)
    rec_metrics, rec_rows = evaluate_rec(model, adapter, load_rec_samples(rec), images, batch_size=2)
    cap_metrics, cap_rows = evaluate_region_captions(model, adapter, load_region_caption_records(regions), images,
                                                     batch_size=2, use_meteor=False)
    # A call made on one rank only must not wait for the others: distributed=False evaluates everything.
    local = None
    if ranks.rank == 1:
        local, _ = evaluate_rec(model, adapter, load_rec_samples(rec)[:3], images, distributed=False)
    with open(f"{out}/rank{ranks.rank}.json", "w") as f:
        json.dump({"rank": ranks.rank, "world": ranks.world_size, "rec": rec_metrics,
                   "rec_index": [r["index"] for r in rec_rows], "rec_sent": [r["sent"] for r in rec_rows],
                   "rec_pred": [r["pred_bbox"] for r in rec_rows],
                   "cap": cap_metrics, "cap_index": [r["index"] for r in cap_rows], "local": local}, f)
    shutdown(ranks)
""")


@pytest.mark.slow
def test_in_process_rec_and_region_captions_two_processes(setup):
    root, images, model_dir, _, rec, regions = setup
    out = root / "out_worker"
    out.mkdir()
    worker = root / "worker.py"
    worker.write_text(WORKER)
    torchrun([str(worker), model_dir, str(images), str(rec), str(regions), str(out)], cwd=root)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in results:
        assert res["world"] == 2
        assert res["rec"]["num_samples"] == res["rec"]["num_records"] == NUM_RECORDS
        # The summary counts the failures of the rows gathered from both ranks (a random model writes no box).
        assert res["rec"]["num_parse_failures"] == sum(p is None for p in res["rec_pred"]) == NUM_RECORDS
        assert res["rec_index"] == list(range(NUM_RECORDS))
        assert res["rec_sent"] == [f"the red circle {k}" for k in range(NUM_RECORDS)]
        assert res["cap"]["num_samples"] == NUM_RECORDS and res["cap_index"] == list(range(NUM_RECORDS))
    assert results[0]["rec"] == results[1]["rec"] and results[0]["cap"] == results[1]["cap"]
    assert results[1]["local"]["num_samples"] == 3 and results[1]["local"]["world_size"] == 1



STOPPING = textwrap.dedent("""
    import json, os, signal, sys
    from sc_tune.evaluation.distributed import init_from_env, shutdown
    from sc_tune.evaluation.progress import SampleLog
    from sc_tune.evaluation.runner import EvaluationStopped, run_sharded
    from sc_tune.preemption import RecordsSignal

    out = sys.argv[1]
    ranks = init_from_env()
    results = {}
    for name, signal_rank in (("unsignalled", None), ("signalled", 1)):
        stop = RecordsSignal((signal.SIGTERM,), "every rank stops after the batch in progress")
        calls = []

        def score_batch(indices):
            calls.append(list(indices))
            if ranks.rank == signal_rank and len(calls) == 1:
                for _ in range(2):  # a second signal changes nothing
                    os.kill(os.getpid(), signal.SIGTERM)
            return [{"i": i} for i in indices]

        log = SampleLog(out, name, {"n": 5}, ranks, stop=stop)
        try:
            with stop.listening():
                rows, _ = run_sharded(5, 2, score_batch, name=name, progress=log)
            results[name] = {"finished": [r["i"] for r in rows]}
        except EvaluationStopped as e:
            results[name] = {"stopped": str(e), "code": e.exit_code}
        results[name]["calls"] = calls
    with open(f"{out}/rank{ranks.rank}.json", "w") as f:
        json.dump(results, f)
    shutdown(ranks)
""")


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_batch_whatever_their_shards(tmp_path):
    """5 samples, 2 ranks, batches of 2: rank 0 holds 2 batches, rank 1 one. Unsignalled, rank 1 takes part in rank
    0's second agreement with no batch left (else their collectives no longer match: a hang). A SIGTERM (twice) on
    rank 1 in its only batch stops both after their first batch, each raising EvaluationStopped, the rows on disk."""
    worker = tmp_path / "stopping.py"
    worker.write_text(STOPPING)
    torchrun([str(worker), str(tmp_path)], cwd=tmp_path, timeout=60)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    unsignalled = [r["unsignalled"] for r in results]
    assert [r["finished"] for r in unsignalled] == [list(range(5))] * 2
    assert [r["calls"] for r in unsignalled] == [[[0, 2], [4]], [[1, 3]]]
    signalled = [r["signalled"] for r in results]
    assert [r["calls"] for r in signalled] == [[[0, 2]], [[1, 3]]]  # rank 0's second batch is left for the resume
    partial = tmp_path / "signalled_samples.partial"
    for r in signalled:
        assert r["code"] == 143
        assert r["stopped"] == (f"stopped by SIGTERM after 4 scored rows (4 of 5 samples, kept in {partial}); the "
                                "same command scores the rest")
    kept = sorted(json.loads(line)["index"] for rank in (0, 1)
                  for line in (partial / f"rank{rank}.jsonl").read_text().splitlines())
    assert kept == [0, 1, 2, 3]
