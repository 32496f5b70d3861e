"""The measurement scripts on CPU. The GPU check runs end to end (``--dry_run``): real sizes built on the meta
device, then every setting it times, at toy size, through the same trainer path the GPU run takes (LoRA, gradient
checkpointing, static decoding, fused decoding), printing the figures the GPU run prints. The decode-step op count
and the locator diagnosis print what they claim; the vision-cache and prompt-cache benchmarks show, at their smallest
settings, that the arm with the cache really used it and gave the same losses or answers."""

import collections
import importlib
import json
import math
import os
import re
import resource
import statistics
import sys
import time

import pytest
import torch

import sc_tune.rollout
from tests import real_checkpoints as real
from tests.conftest import ROOT

ISSUE_KEYS = ("decode_ms_per_step", "weight_bytes", "weight_read_floor_ms", "decode_floor_ratio",
              "generation_batch_size", "new_tokens_per_s", "samples_per_s")


def _script(monkeypatch, name: str):
    """``scripts/<name>.py``, imported afresh (a test's stand-ins on an earlier import do not carry over), with
    scripts/ on the path for the modules it imports."""
    monkeypatch.syspath_prepend(f"{ROOT}/scripts")
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def _gpu_check_module(monkeypatch):
    """scripts/gpu_check.py, imported afresh. It wraps ``sc_tune.rollout.generate`` to count tokens on import; the
    original is put back after the test."""
    monkeypatch.setattr(sc_tune.rollout, "generate", sc_tune.rollout.generate)
    return _script(monkeypatch, "gpu_check")


def test_gpu_check_dry_run_prints_the_decoding_figures_and_takes_the_fast_path(capsys, monkeypatch):
    gpu_check = _gpu_check_module(monkeypatch)
    # the card's bandwidth as a round figure, so the floor can be checked exactly (copy_bandwidth has its own test)
    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda device, megabytes: 5e9)
    judged, targets_met = [], gpu_check.targets_met  # device_summary's rule: what gpu_check hands it
    monkeypatch.setattr(gpu_check, "targets_met", lambda *figures: judged.append(figures) or targets_met(*figures))
    started, rss_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu_check.main(["--dry_run", "--profile", "1"])  # the GPU run's settings: fast, fast_unfused, transformers
    elapsed, rss_after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = capsys.readouterr().out
    # the real sizes on the meta device: the LoRA adapter alone trains (rank 64: Qwen2.5-VL's 7 projections, Qwen-VL's
    # 4), and a decode step reads the language model's bf16 weights and the float32 adapter (see the test below)
    assert ("[meta] qwen2.5-vl-7b: 8.45 B parameters, 161.5 M trainable (the LoRA adapter), 0.63 B frozen vision "
            "parameters, 14.79 GB read per decode step, vision cache trunk: yes, static decoding: yes\n") in out
    assert ("[meta] qwen-vl-chat: 9.77 B parameters, 112.2 M trainable (the LoRA adapter), 1.86 B frozen vision "
            "parameters, 14.65 GB read per decode step, vision cache trunk: yes, static decoding: yes\n") in out
    results = json.loads(out.strip().splitlines()[-1])
    assert results["copy_bandwidth_gb_s"] == 5.0
    for name in ("mini-qwen2.5-vl", "mini-qwen-vl-chat"):  # the dry run's sizes (scripts/bench_configs.py)
        report = results[name]
        # CPU's figure: the process's high-water mark (Linux counts it in KiB), in GiB
        assert report["peak_memory_kind"] == "process peak RSS"
        assert rss_before / 2**20 - 0.01 <= report["peak_memory_gib"] <= rss_after / 2**20 + 0.01, report
        timed = {key for key in report if key.startswith(("describer_", "locator_"))}
        assert timed == {"describer_fast", "locator_fast", "describer_fast_unfused", "describer_transformers",
                         "locator_transformers"}  # the unfused setting differs from fast in the describer only
        for key in sorted(timed):
            figures = report[key]
            assert all(figures[k] is not None and figures[k] > 0 for k in ISSUE_KEYS), (name, key, figures)
            ratio = figures["decode_ms_per_step"] / figures["weight_read_floor_ms"]
            assert abs(figures["decode_floor_ratio"] - ratio) <= 1e-3 * ratio
            # the floor: the step's weight bytes over the copy's bandwidth
            assert figures["weight_bytes"] == report["weight_bytes"]
            assert figures["weight_read_floor_ms"] == round(1000 * figures["weight_bytes"] / 5e9, 4), figures
            assert 0 < figures["warmup_seconds"] < elapsed
            # a unit is one rollout of the batch: 2 optimizer steps of the describer (2 PPO epochs), 1 of the locator
            steps = 2 if key.startswith("describer") else 1
            samples = figures["samples_per_s"] * figures["step_seconds"] * steps
            assert abs(samples - figures["generation_batch_size"]) <= 0.01 * samples, (key, figures)
            split = figures["generate_seconds_per_unit"]
            if split is not None:  # SC-Tune's loop: its decode seconds over its decode steps (a dry run times 1 unit)
                steps_decoded = sum(figures["decode_rows"].values())
                per_step = 1000 * split["decode_steps"] / steps_decoded
                rounding = 1000 * 0.0005 / steps_decoded + 0.0005  # seconds to 3 decimals, then ms to 3 decimals
                assert abs(figures["decode_ms_per_step"] - per_step) <= rounding + 1e-9, (key, figures)
                # the acceptance's token rate: the tokens written over generate's seconds (to 3 decimals, hence
                # the margin); a call writes at most one token per row for its prefill and for each decode step
                rate = figures["new_tokens"] / split["generate"]
                assert abs(figures["new_tokens_per_s"] - rate) <= rate * 0.0005 / split["generate"] + 0.05, figures
                most = sum(int(rows) * (steps + figures["decode_calls"])
                           for rows, steps in figures["decode_rows"].items())
                assert 0 < figures["new_tokens"] <= most, figures
        fast, unfused = report["describer_fast"], report["describer_fast_unfused"]
        # judged by device_summary's rule on the describer's fast figures: a dry run's batch is far below 64
        assert (fast["new_tokens_per_s"], fast["decode_floor_ratio"], fast["generation_batch_size"]) in judged
        assert report["acceptance"] == {"new_tokens_per_s": fast["new_tokens_per_s"],
                                        "decode_floor_ratio": fast["decode_floor_ratio"], "met": False}
        # fused: one loop of 2B rows for the captions, then locating's 2B rows; unfused: B, B (resumed), 2B
        assert fast["fused_decoding"] is True and fast["decode_calls"] == 2 and list(fast["decode_rows"]) == ["4"]
        assert unfused["fused_decoding"] is False and unfused["decode_calls"] == 3
        assert set(unfused["decode_rows"]) == {"2", "4"}
        # The GPU recipe (LoRA snapshot, checkpointing) decodes the unfused greedy captions from the prompt cache;
        # locating starts from the scored image prefix (both families move cached columns).
        assert unfused["prompt_cache_engaged"] is True
        assert fast["locating_prefix_engaged"] is True and unfused["locating_prefix_engaged"] is True
        # fused: the scoring pass starts from the loop's cache of the snapshot's prompts (unfused: the other way round)
        assert fast["scoring_cache_engaged"] is True and unfused["scoring_cache_engaged"] is False
        assert report["describer_transformers"]["decode_calls"] == 0  # transformers' own loop: measured by hooks
        for key in ("describer_transformers", "locator_transformers"):  # its decode steps: generate less its prefills
            figures = report[key]
            decode_seconds = figures["decode_ms_per_step"] * sum(figures["decode_rows"].values()) / 1000
            assert 0 < decode_seconds < figures["new_tokens"] / figures["new_tokens_per_s"], (key, figures)
        assert fast["rows_stopped_at_box"] == 0  # SC-Tune's loop's count; random weights write no box
        assert report["describer_fast"]["stages_per_step"]["vision_encoding"] > 0
        split = report["describer_fast"]["generate_seconds_per_unit"]
        assert 0 < split["first_decode_steps"] < split["decode_steps"] and split["capture"] == 0  # no graphs on CPU
        # a part of the rest: the tower that transformers runs in generate before the loop is counted as vision
        assert 0 < split["outside_decode_loop"] <= split["rest"] + 0.002, split
        for key in ("describer_fast", "locator_fast", "describer_fast_unfused"):
            assert report[key]["warmup_units"] == 1 and report[key]["compiles_in_timed_units"] == 0
            profile = report[key]["profile"]  # one decode step of SC-Tune's loop (CPU: its top-level operators)
            assert profile["steps"] == 1 and profile["kernels_per_step"] > 10, profile
            assert 0 < profile["busy_ms_per_step"] <= profile["wall_ms_per_step"], profile
            assert abs(sum(c["ms_per_step"] for c in profile["by_class"].values()) - profile["kernel_ms_per_step"]) < 0.01
            assert sum(c["per_step"] for c in profile["by_class"].values()) == profile["kernels_per_step"]
            for entry in [*profile["by_class"].values(), *profile["top"]]:  # one step: whole counts
                assert entry["per_step"] >= 1 and entry["ms_per_step"] >= 0, profile
            assert [e["ms_per_step"] for e in profile["top"]] == sorted((e["ms_per_step"] for e in profile["top"]),
                                                                         reverse=True)
        assert "profile" not in report["describer_transformers"]  # transformers' loop has no step hooks
        split = report["describer_fast"]["generate_seconds_per_unit"]
        assert split["decode_steps"] > 0 and split["prefill"] > 0 and split["vision_tower"] > 0
        assert split["decode_steps"] + split["prefill"] + split["vision_tower"] < split["generate"] + 0.01
        assert report["describer_transformers"]["generate_seconds_per_unit"] is None


def test_gpu_check_main_picks_the_sizes_device_and_run_lengths_of_a_dry_run_and_of_a_gpu_run(capsys, monkeypatch,
                                                                                             tmp_path):
    """``main``'s choices, with the measurement itself stood in for (``run_config``, ``copy_bandwidth`` and the meta
    check record what they are handed): a dry run takes the mini sizes on CPU in float32, batch 2, 1 unit, at most 4 new
    tokens and a 64 MB copy; a GPU run the real sizes in bf16, batch 64, 2 units, 30 new tokens and a 2,048 MB copy;
    flags given win over both; the meta check builds only the real sizes named; unknown settings and a missing card
    stop it with a message; the last line holds the copy's bandwidth in GB/s and each configuration's report."""
    gpu_check = _gpu_check_module(monkeypatch)
    runs, copies, checked = [], [], []
    monkeypatch.setattr(gpu_check, "check_instantiates", checked.append)
    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda device, megabytes: copies.append((device, megabytes))
                        or 123.456e9)

    def run_config(name, opts, device, dtype, meter, bandwidth):
        runs.append((name, device, dtype, opts.batch, opts.units, opts.max_new_tokens, opts.settings, bandwidth))
        return {"ran": name}

    monkeypatch.setattr(gpu_check, "run_config", run_config)

    def main(*argv):
        runs.clear(), copies.clear(), checked.clear()
        gpu_check.main(list(argv))
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    settings = gpu_check.DEFAULT_SETTINGS
    results = main("--dry_run")
    assert checked == [["qwen2.5-vl-7b", "qwen-vl-chat"]] and copies == [("cpu", 64)]
    assert runs == [(name, "cpu", torch.float32, 2, 1, 4, settings, 123.456e9)
                    for name in ("mini-qwen2.5-vl", "mini-qwen-vl-chat")]
    assert results == {"copy_bandwidth_gb_s": 123.5, "device": "cpu", "torch": torch.__version__,
                       "mini-qwen2.5-vl": {"ran": "mini-qwen2.5-vl"}, "mini-qwen-vl-chat": {"ran": "mini-qwen-vl-chat"}}

    main("--dry_run", "--configs", "toy-qwen2.5-vl,qwen-vl-chat", "--batch", "3", "--units", "2", "--max_new_tokens",
         "3", "--copy_megabytes", "8", "--settings", "fast")
    assert checked == [["qwen-vl-chat"]] and copies == [("cpu", 8)]  # the meta check: real (GPU) sizes only
    assert [run[:7] for run in runs] == [(name, "cpu", torch.float32, 3, 2, 3, "fast")
                                         for name in ("toy-qwen2.5-vl", "qwen-vl-chat")]
    main("--dry_run", "--max_new_tokens", "30", "--profile_dir", str(tmp_path))  # a trace folder that exists: kept
    assert {run[5] for run in runs} == {4}  # a dry run never decodes more than 4 tokens

    with pytest.raises(SystemExit):
        gpu_check.main(["--dry_run", "--settings", "fast,fastest"])
    assert "unknown settings ['fastest']" in capsys.readouterr().err and not runs[2:]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main([])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a stand-in card")
    results = main()
    assert checked == [["qwen2.5-vl-7b", "qwen-vl-chat"]] and copies == [("cuda", 2048)]
    assert runs == [(name, "cuda", torch.bfloat16, 64, 2, 30, settings, 123.456e9)
                    for name in ("qwen2.5-vl-7b", "qwen-vl-chat")]
    assert results["device"] == "cuda" and set(results) >= {"qwen2.5-vl-7b", "qwen-vl-chat"}
    main("--configs", "qwen2.5-vl-7b", "--batch", "128", "--units", "3")
    assert checked == [["qwen2.5-vl-7b"]] and [run[3:5] for run in runs] == [(128, 3)]


def test_gpu_check_divides_each_figure_by_its_units_and_steps_and_splits_generate_into_its_parts(capsys, monkeypatch,
                                                                                               tmp_path):
    """Two timed units (a dry run's default is one, where dividing by the units and multiplying by them agree), with the
    units' own stage seconds recorded, on the GPU recipe's model (LoRA, the snapshot as a second adapter) and trainer
    settings: ``stages_per_step`` is each stage's median over the units per optimizer step; the generate split's parts
    per unit add up to the whole (decode steps + prefill + vision tower + rest); the prefill figure beside it
    (``prefill_seconds_per_unit``: SC-Tune's timed prefills, the tower inside them included) exceeds the split's
    language-model part by the tower's seconds for Qwen-VL, whose model runs its tower inside the prefill, and equals
    it for Qwen2.5-VL, whose tower runs in generate before the loop. With ``--profile_dir`` each profiled unit's trace
    is written to that folder, made for it."""
    gpu_check = _gpu_check_module(monkeypatch)
    stage_rows, adapters, settings = [], [], []  # per configuration: each unit's stage seconds by phase, warm-up first

    class Recorded(gpu_check.ThisTrainer):
        def __init__(self, model, adapter, samples, args):
            super().__init__(model, adapter, samples, args)
            stage_rows.append({"describer": [], "locator": []})
            adapters.append(sorted(getattr(model, "peft_config", {})))
            settings.append({key: getattr(args, key) for key in (
                "per_device_train_batch_size", "describer_update_steps", "locator_update_steps", "ppo_epochs",
                "use_cpu", "bf16", "gradient_checkpointing", "describer_max_new_tokens", "skip_preflight",
                "static_decoding", "policy_kl_stop", "ratio_threshold")})

        def describer(self, inputs):
            stage_rows[-1]["describer"].append(super().describer(inputs))
            return stage_rows[-1]["describer"][-1]

        def locator(self, inputs):
            stage_rows[-1]["locator"].append(super().locator(inputs))
            return stage_rows[-1]["locator"][-1]

    monkeypatch.setattr(gpu_check, "ThisTrainer", Recorded)
    traces = tmp_path / "traces" / "not yet made"
    gpu_check.main(["--dry_run", "--settings", "fast", "--units", "2", "--profile", "2", "--profile_dir", str(traces)])
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    configurations = (("mini-qwen2.5-vl", False), ("mini-qwen-vl-chat", True))
    assert adapters == [["default", "snapshot"]] * 2  # the GPU recipe: LoRA, the snapshot as a second adapter
    # a unit: one describer rollout and its 2 PPO epochs, then one locator step; CPU in float32 (a GPU run: bf16);
    # every epoch runs (no early stop) and the preflight is skipped (random weights write no box that parses)
    assert settings == [{"per_device_train_batch_size": 2, "describer_update_steps": 1, "locator_update_steps": 1,
                         "ppo_epochs": 2, "use_cpu": True, "bf16": False, "gradient_checkpointing": True,
                         "describer_max_new_tokens": 4, "skip_preflight": True, "static_decoding": "true",
                         "policy_kl_stop": float("inf"), "ratio_threshold": float("inf")}] * 2
    # a warm-up unit, the two timed units, the profiled unit
    assert [[len(units) for units in by_phase.values()] for by_phase in stage_rows] == [[4, 4], [4, 4]]
    for (name, tower_inside_prefill), by_phase in zip(configurations, stage_rows):
        rows = {phase: units[1:3] for phase, units in by_phase.items()}
        for phase, steps in (("describer", 2), ("locator", 1)):
            figures = results[name][f"{phase}_fast"]
            assert "error" not in figures["profile"] and figures["profile"]["steps"] == 2, figures["profile"]
            assert (traces / f"{name}_{phase}_fast.json.gz").stat().st_size > 0
            medians = {stage: statistics.median(row[stage] for row in rows[phase]) for stage in rows[phase][0]}
            assert figures["stages_per_step"] == {stage: round(median / steps, 3) for stage, median in medians.items()}
            split = figures["generate_seconds_per_unit"]
            parts = split["decode_steps"] + split["prefill"] + split["vision_tower"] + split["rest"]
            assert abs(parts - split["generate"]) <= 0.0025, (name, phase, split)  # four figures to 3 decimals
            assert split["vision_tower"] == round(sum(row["vision_encoding"] for row in rows[phase]) / 2, 3)
            extra = figures["prefill_seconds_per_unit"] - split["prefill"]
            assert abs(extra - (split["vision_tower"] if tower_inside_prefill else 0.0)) <= 0.0015, (name, phase)
            assert split["vision_tower"] > 0.003, split  # each unit encodes its images (the rows' own figures)


def test_gpu_check_measures_the_cards_bandwidth_as_the_bytes_a_copy_reads_and_writes_per_second(monkeypatch):
    """The floor's denominator: ``copy_bandwidth`` times 10 copies of ``megabytes`` MiB after 2 untimed ones, and
    counts each byte twice (read once, written once): 2 x 1 MiB x 10 in the 2.5 s the clock says they took."""
    from types import SimpleNamespace

    gpu_check = _gpu_check_module(monkeypatch)
    clock = iter([100.0, 102.5])
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    copies = []
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, source: copies.append(self.numel()) or self)
    assert gpu_check.copy_bandwidth("cpu", 1) == 2 * 2**20 * 10 / 2.5
    assert copies == [2**20] * 12


def test_gpu_check_counts_the_bytes_a_qwen2_5_vl_7b_decode_step_reads_from_its_published_architecture(monkeypatch,
                                                                                                      tmp_path):
    """The floor's numerator at the acceptance size (bf16, LoRA, on the meta device): Qwen2.5-7B's language model,
    worked out here from its published sizes, with the output layer and the policy's LoRA adapter (in float32), and
    without the vision tower, the input embedding table (a step reads one row of it per token) and the snapshot's
    adapter: 14.79 GB. Tied embeddings are the same table, read once."""
    from peft import LoraConfig

    from sc_tune.arguments import LoraArguments
    from sc_tune.modeling import apply_lora, freeze_vision_tower

    gpu_check = _gpu_check_module(monkeypatch)
    from bench_configs import prepare

    hidden, layers, kv, mlp, vocab, rank = 3584, 28, 4 * 128, 18944, 152064, 64
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden  # q, k, v with biases; o
    layer = attention + 3 * hidden * mlp + 2 * hidden  # gate, up, down; two RMSNorms
    lora = rank * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + mlp))  # r x (in + out), 7 projections
    lm_head = vocab * hidden
    # the sizes above, checked: the layers and the final norm are the model card's 6.53 B non-embedding parameters
    assert layers * layer + hidden == 6_525_621_760

    model, adapter = prepare("qwen2.5-vl-7b", str(tmp_path), device="meta", dtype=torch.bfloat16)
    freeze_vision_tower(model, adapter)
    model = apply_lora(model, adapter, LoraArguments(use_lora=True), gradient_checkpointing=True)  # as run_config
    model.add_adapter("snapshot", LoraConfig(**model.peft_config["default"].to_dict()))  # as sc_tune.snapshot does
    # bf16 weights, 2 bytes each; PEFT keeps the adapters' weights in float32 under a bf16 model, 4 bytes each
    expected = 2 * (layers * layer + hidden + lm_head) + 4 * layers * lora
    assert expected == 14_787_161_088
    assert {p.dtype for n, p in model.named_parameters() if ".default." in n} == {torch.float32}
    assert gpu_check.decode_weight_bytes(model, adapter) == expected
    base = model.base_model.model
    base.lm_head.weight = base.get_input_embeddings().weight  # tied, as in the 3B release
    assert gpu_check.decode_weight_bytes(model, adapter) == expected


@pytest.mark.skipif(not os.path.isfile(real.path("Qwen__Qwen2.5-VL-7B-Instruct", "config.json")),
                    reason="the released Qwen2.5-VL-7B-Instruct config.json is not at hand")
def test_the_gpu_checks_qwen2_5_vl_7b_is_the_released_architecture(tmp_path, monkeypatch):
    """``qwen2.5-vl-7b`` of scripts/bench_configs.py (issue 21's acceptance size) against the released config.json, read
    by transformers: every field equal but the tokenizer's ids (the benchmark's tokenizer is the tiny one, the output
    layer sized to the real vocabulary) and keys of the release's older layout that transformers keeps as they are
    (``in_chans``, ``spatial_patch_size``, the RoPE ``type`` marker, ``vision_token_id``). A size written wrong
    times another model; an epsilon or a RoPE base written wrong computes another one."""
    import shutil

    from transformers import AutoConfig

    prepare = _script(monkeypatch, "bench_configs").prepare

    model, _ = prepare("qwen2.5-vl-7b", str(tmp_path / "bench"), device="meta", dtype=torch.bfloat16)
    (tmp_path / "released").mkdir()
    shutil.copy(real.path("Qwen__Qwen2.5-VL-7B-Instruct", "config.json"), tmp_path / "released")
    released = AutoConfig.from_pretrained(str(tmp_path / "released")).to_dict()

    def flat(config: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in config.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    ours, theirs = flat(model.config.to_dict()), flat(released)
    tokenizer_ids = {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                     "text_config.bos_token_id", "text_config.eos_token_id", "text_config.pad_token_id"}
    older_layout = {"vision_config.in_chans", "vision_config.spatial_patch_size", "text_config.rope_parameters.type",
                    "vision_token_id",
                    "text_config.tie_word_embeddings"}  # the release's is top-level (compared below)
    bookkeeping = {"_name_or_path", "architectures", "vision_config.dtype"}
    differ = {key: (ours.get(key), theirs.get(key)) for key in ours.keys() | theirs.keys()
              if ours.get(key) != theirs.get(key) and key not in tokenizer_ids | older_layout | bookkeeping}
    assert differ == {}
    assert ours["text_config.num_hidden_layers"] == 28 and ours["vision_config.depth"] == 32  # the file was read
    # untied: the output layer is a table of its own, read at every decode step (gpu_check's weight bytes)
    assert (ours["tie_word_embeddings"] is ours["text_config.tie_word_embeddings"] is theirs["tie_word_embeddings"]
            is False)


# Qwen/Qwen-VL-Chat's config.json as released (the hub file; transformers_version 4.31.0), less the remote code's
# bookkeeping (architectures, auto_map, onnx_safe, tokenizer_type, transformers_version). image_start_id is the
# tokenizer's id of <img>, 151857 in the release; the benchmark's tiny tokenizer puts it elsewhere.
QWEN_VL_CHAT_RELEASED = {
    "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 22016, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True,
    "num_attention_heads": 32, "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 1.0,
    "scale_attn_weights": True, "seq_length": 2048, "tie_word_embeddings": False, "use_cache": True,
    "use_dynamic_ntk": True, "use_logn_attn": True, "vocab_size": 151936,
    "visual": {"heads": 16, "image_size": 448, "layers": 48, "mlp_ratio": 4.9231, "output_dim": 4096,
               "patch_size": 14, "width": 1664},
}


def test_the_gpu_checks_qwen_vl_chat_is_the_released_architecture(tmp_path, monkeypatch):
    """``qwen-vl-chat`` of scripts/bench_configs.py (the paper's model, the side-by-side's second row) against the
    released config.json's values (quoted above): each released field equal, and the parameter counts the Qwen-VL
    paper gives per part (its Table 1): vision encoder 1.9 B, VL adapter (the resampler) 0.08 B, LLM 7.7 B. Their
    sum, 9.66 B, is the paper's "9.6 B". The resampler's 256 queries are not a config field in the release (its
    remote code fixes them); here they are ``n_queries``."""
    prepare = _script(monkeypatch, "bench_configs").prepare

    model, _ = prepare("qwen-vl-chat", str(tmp_path), device="meta", dtype=torch.bfloat16)
    ours = model.config.to_dict()
    released_visual = QWEN_VL_CHAT_RELEASED["visual"]
    assert {key: ours[key] for key in QWEN_VL_CHAT_RELEASED if key != "visual"} == {
        key: value for key, value in QWEN_VL_CHAT_RELEASED.items() if key != "visual"}
    assert {key: ours["visual"][key] for key in released_visual} == released_visual
    assert ours["visual"]["n_queries"] == 256

    def billions(prefix: str) -> float:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix)) / 1e9

    resampler = billions("transformer.visual.attn_pool")
    vision = billions("transformer.visual") - resampler
    llm = billions("") - billions("transformer.visual")
    assert (round(vision, 1), round(resampler, 2), round(llm, 1)) == (1.9, 0.08, 7.7)
    assert 9.6 < vision + resampler + llm < 9.7


@pytest.mark.parametrize("name, millions, text, vision, full_attention, visual_tokens", [
    ("toy-qwen2.5-vl", 18.4, (512, 4, 8, 2), (192, 4, 4), [1, 3], 256),
    ("toy-qwen2.5-vl-100m", 125.7, (1024, 8, 16, 4), (192, 4, 4), [1, 3], 256),
    ("mini-qwen2.5-vl", 3.1, (256, 2, 4, 2), (128, 2, 4), [1], 64),
    ("toy-qwen-vl-chat", 14.3, (512, 4, 4), (192, 5, 2), None, 256),
    ("mini-qwen-vl-chat", 2.4, (256, 2, 4), (128, 2, 2), None, 64),
])
def test_the_benchmark_sizes_are_the_ones_their_figures_name(name, millions, text, vision, full_attention,
                                                             visual_tokens, tmp_path, monkeypatch):
    """The CPU sizes of scripts/bench_configs.py as its docstring and docs/performance.md give them: parameters (the
    step and memory tables name 18.4 M, 14.3 M and 125.7 M), the language model's width, layers, query and key/value
    heads, the tower's width and blocks (Qwen2.5-VL's full-attention blocks among them: the mini size keeps one
    windowed block and one full one) and the visual tokens of one prompt (448 px: 1,024 patches merged or resampled to
    256; 224 px: 64), the tower's heads, the M-RoPE sections (half a 64-wide head: 8 + 12 + 12), and every size's batch
    (8, as the tables run it) and image side. A size changed under the tables' figures would time another model than
    they say."""
    from PIL import Image

    bench_configs = _script(monkeypatch, "bench_configs")
    assert {key: (bench.batch, bench.image_size) for key, bench in bench_configs.CONFIGS.items()} == {
        "toy-qwen2.5-vl": (8, 448), "toy-qwen-vl-chat": (8, 448), "mini-qwen2.5-vl": (8, 224),
        "mini-qwen-vl-chat": (8, 224), "toy-qwen2.5-vl-100m": (8, 448), "qwen2.5-vl-7b": (8, 448),
        "qwen-vl-chat": (8, 448)}

    model, adapter = bench_configs.prepare(name, str(tmp_path), device="meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
    side = bench_configs.CONFIGS[name].image_size
    image = adapter.prepare_image(Image.new("RGB", (side, side)))
    prompt_ids = adapter.encode_prompt(adapter.describer_prompt([10, 10, 100, 100], image), image)
    config = model.config
    if full_attention is None:  # Qwen-VL: the resampler's queries sit between <img> and </img>
        start = config.visual["image_start_id"]
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == text
        assert (config.visual["width"], config.visual["layers"], config.visual["heads"]) == vision
        assert config.visual["image_size"] == side
        assert prompt_ids.index(start + 1) - prompt_ids.index(start) - 1 == visual_tokens
    else:
        text_config, vision_config = config.text_config, config.vision_config
        assert (text_config.hidden_size, text_config.num_hidden_layers, text_config.num_attention_heads,
                text_config.num_key_value_heads) == text
        assert (vision_config.hidden_size, vision_config.depth, vision_config.num_heads) == vision
        assert text_config.rope_parameters["mrope_section"] == [8, 12, 12]
        assert text_config.hidden_size // text_config.num_attention_heads == 64  # the sections' sum is half of it
        assert vision_config.fullatt_block_indexes == full_attention
        assert prompt_ids.count(adapter.image_token_id) == visual_tokens


def test_bench_step_replays_the_references_passes_and_reports_the_median_of_the_pairs_ratios(capsys, monkeypatch):
    """``scripts/bench_step.py`` (the side-by-side of docs/performance.md) on the mini Qwen2.5-VL: arm B replays the
    reference's passes as its docstring lists them (a describer unit: 4 generate calls, 4 no-grad log-prob passes and
    2 forward/backward passes; a locator unit: 2, 4 and 1), the pairs alternate which arm runs first, and the result
    is the median of the per-pair ratios this / reference with its quartiles (the clock scripted here: 1 s, 3 s and
    2 s for this arm against 2 s for the reference). Arm A's units refuse a step the schedule gives another phase."""
    from types import SimpleNamespace

    import sc_tune.phases

    bench_step = _script(monkeypatch, "bench_step")

    calls, sampled = [], []
    for name in ("describe", "locate"):  # the replay's generate calls (arm A decodes through its own cycle)
        real = getattr(bench_step, name)

        def counted(model, adapter, images, texts_or_boxes, settings, _real=real, _name=name):
            calls.append(_name)
            if _name == "describe":
                sampled.append(settings.do_sample)
            return _real(model, adapter, images, texts_or_boxes, settings)

        monkeypatch.setattr(bench_step, name, counted)
    for name in ("_full_logprobs", "_backward_and_step"):
        real = getattr(bench_step.ReferenceReplay, name)
        monkeypatch.setattr(bench_step.ReferenceReplay, name, lambda self, *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(self, *a, **k))
    # per phase: one warm-up unit of each arm (its figures never count), then three pairs; the units' stage seconds
    # scripted too (a stage a unit did not time counts 0 in the median)
    order, seconds = [], {"a": iter([100.0, 1.0, 3.0, 2.0] * 2), "b": iter([100.0, 2.0, 2.0, 2.0] * 2)}
    stages = {"a": iter([{"generate": 50.0}, {"generate": 0.5, "loss": 0.2}, {"generate": 1.5},
                         {"generate": 1.0, "loss": 0.4}] * 2),
              "b": iter([{"generate": 50.0}] + [{"generate": 1.0, "backward": 0.5}] * 3 + [{"generate": 50.0}]
                        + [{"generate": 1.0, "backward": 0.5}] * 3)}
    real_timed = bench_step.timed

    def timed(fn, inputs, device):
        arm = "b" if isinstance(fn.__self__, bench_step.ReferenceReplay) else "a"
        calls.clear()
        sampled.clear()
        real_timed(fn, inputs, device)
        order.append((arm, fn.__name__, (dict(collections.Counter(calls)), list(sampled)) if arm == "b" else None))
        return next(seconds[arm]), next(stages[arm])

    monkeypatch.setattr(bench_step, "timed", timed)
    bench_step.main(["--config", "mini-qwen2.5-vl", "--batch", "2", "--pairs", "3", "--warmup", "1"])
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])

    # 4 no-grad log-prob passes + 2 with grad; the policy's caption sampled, the copy's greedy
    describer = ({"describe": 2, "locate": 2, "_full_logprobs": 6, "_backward_and_step": 2}, [True, False])
    locator = ({"describe": 1, "locate": 1, "_full_logprobs": 4, "_backward_and_step": 1}, [False])
    assert order == [("a", "describer", None), ("b", "describer", describer),  # the warm-up
                     ("a", "describer", None), ("b", "describer", describer), ("b", "describer", describer),
                     ("a", "describer", None), ("a", "describer", None), ("b", "describer", describer),
                     ("a", "locator", None), ("b", "locator", locator),
                     ("a", "locator", None), ("b", "locator", locator), ("b", "locator", locator),
                     ("a", "locator", None), ("a", "locator", None), ("b", "locator", locator)]
    for phase in ("describer", "locator"):
        assert result[f"{phase}_ratio"] == 1.0  # the ratios 0.5, 1.5 and 1.0
        assert result[f"{phase}_ratio_iqr"] == [0.75, 1.25]
        assert result[f"{phase}_seconds"] == {"this": 2.0, "reference": 2.0}
        assert result[f"{phase}_stages_this"] == {"generate": 1.0, "loss": 0.2}  # loss: the median of 0.2, 0, 0.4
        assert result[f"{phase}_stages_reference"] == {"backward": 0.5, "generate": 1.0}
        assert f"  {phase} pair 1: this 3.00 s, reference 2.00 s" in printed
        assert (f"{phase}: ratio (this / reference) median 1.000 (IQR 0.750-1.250, min 0.500, max 1.500); this 2.00 s, "
                "reference 2.00 s per 2 samples") in printed
    # the first line: the model, batch and prompt, the vision tower's share (the JSON's, in %), the cache and device
    first = re.fullmatch(r"config mini-qwen2\.5-vl: (\d+\.\d) M parameters, batch 2, describer prompt (\d+) tokens, "
                         r"vision tower (\d+) % of a prompt forward, vision cache on, cpu float32, torch threads \d+, "
                         r"load average [\d. ]+", next(line for line in printed if line.startswith("config ")))
    assert first, printed
    assert 1 < float(first[1]) < 100 and 64 < int(first[2]) < 200  # 64 visual tokens at 224 px, and the text
    # the JSON's share is rounded to 3 digits, the line's percentage from the unrounded one
    assert abs(int(first[3]) - 100 * result["vision_share"]) <= 0.55 and 0 < result["vision_share"] < 1
    # each stage's share of the arm's median unit (2 s)
    assert printed.count("  this stages (median s per unit): generate 1.00 s (50 %), loss 0.20 s (10 %)") == 2
    assert printed.count("  reference stages (median s per unit): backward 0.50 s (25 %), generate 1.00 s (50 %)") == 2
    assert (result["config"], result["pairs"], result["batch"]) == ("mini-qwen2.5-vl", 3, 2)
    # arm A's units run the steps the schedule gives their phase, and refuse any other
    ours = bench_step.ThisTrainer.__new__(bench_step.ThisTrainer)
    ours.trainer = SimpleNamespace(schedule=sc_tune.phases.PhaseSchedule(1, 1, 2, 1e-5, 1e-5))
    with pytest.raises(RuntimeError, match="step 2 is a locator step .*not the describer step"):
        ours._step(2, None, "describer", ppo_epoch=0)
    with pytest.raises(RuntimeError, match=r"step 3 is a describer step \(PPO epoch 0\), not the describer step "
                                           r"\(epoch 1\)"):
        ours._step(3, None, "describer", ppo_epoch=1)


def test_bench_step_vision_share_is_the_towers_seconds_over_a_whole_prompt_forward(monkeypatch):
    """``vision_share`` (the side-by-side's first line): per repeat, the seconds between the vision tower's pre- and
    post-hook over the whole no-grad forward's, the median of three; the hooks are removed after; a family without a
    vision trunk has no share (NaN). The model here calls its tower once per forward, the clock is scripted."""
    from types import SimpleNamespace

    bench_step = _script(monkeypatch, "bench_step")

    tower = torch.nn.Identity()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, input_ids, use_cache):
            self.seen.append((input_ids.tolist(), use_cache))
            return tower(input_ids)

    adapter = SimpleNamespace(
        vision_trunk=lambda model: SimpleNamespace(tower=tower), prepare_image=lambda image: f"prepared {image}",
        describer_prompt=lambda box, image: f"{box} in {image}",
        build_batch=lambda prompts, images: SimpleNamespace(inputs={"input_ids": torch.tensor([len(prompts)])}))
    # per repeat: the forward's start, the tower's start and end, the forward's end -> shares 0.5, 0.25, 0.625
    clock = iter([0.0, 1.0, 3.0, 4.0, 10.0, 10.5, 11.0, 12.0, 20.0, 21.0, 23.5, 24.0])
    monkeypatch.setattr(bench_step, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    model = Model()
    inputs = {"images": ["a", "b"], "boxes": torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.6]])}
    assert bench_step.vision_share(model, adapter, inputs) == 0.5
    assert model.seen == [([2], False)] * 3  # the describer batch of both boxes, without a cache
    assert not tower._forward_hooks and not tower._forward_pre_hooks
    adapter.vision_trunk = lambda model: None
    assert math.isnan(bench_step.vision_share(model, adapter, inputs))


def test_bench_step_times_a_unit_and_takes_the_quartiles(monkeypatch):
    """``timed``: a unit's seconds on the clock around it, with the stage seconds it returns; ``quartiles``: the
    median first, then the first and third quartiles."""
    from types import SimpleNamespace

    bench_step = _script(monkeypatch, "bench_step")

    clock, seen = iter([5.0, 7.5]), []
    monkeypatch.setattr(bench_step, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert bench_step.timed(lambda inputs: seen.append(inputs) or {"generate": 1.0}, "batch", "cpu") == (
        2.5, {"generate": 1.0})
    assert seen == ["batch"]
    assert bench_step.quartiles([5.0, 1.0, 4.0, 2.0, 3.0]) == (3.0, 2.0, 4.0)


def test_gpu_check_profile_sums_each_kernel_and_class_per_step_and_counts_overlaps_once_as_busy(monkeypatch):
    """``DecodeProfile.summary`` on hand-made CUDA kernels (microseconds) of a 2-step window of 10 ms: per step, the
    kernels, their summed time, the time the device was busy (overlapping kernels counted once: 0-100 and 50-150 are
    150 us busy, not 200), each class and the costliest names; the host's operators are not kernels."""
    from types import SimpleNamespace

    gpu_check = _gpu_check_module(monkeypatch)
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device_type=cuda):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device_type,
                               cpu_parent=None)

    events = [event("nvjet_tst_gemm", 0, 100), event("flash_fwd_kernel", 50, 150), event("nvjet_tst_gemm", 300, 400),
              event("triton_poi_fused_add", 500, 520), event("nvjet_tst_gemm", 1000, 1100),
              event("aten::linear", 0, 5000, device_type=cpu)]
    window = gpu_check.DecodeProfile("cuda", first=3, count=2)
    window.profiler, window.steps, window.done, window.wall = SimpleNamespace(events=lambda: events), 2, True, 0.010
    assert window.summary() == {
        "steps": 2, "what": "CUDA kernels", "kernels_per_step": 2.5,
        "kernel_ms_per_step": 0.21,  # (100 + 100 + 100 + 20 + 100) us / 2 steps
        "busy_ms_per_step": 0.185,  # (150 + 100 + 20 + 100) us / 2
        "wall_ms_per_step": 5.0,
        "by_class": {"gemm": {"ms_per_step": 0.15, "per_step": 1.5}, "attention": {"ms_per_step": 0.05, "per_step": 0.5},
                     "elementwise": {"ms_per_step": 0.01, "per_step": 0.5}},
        "top": [{"name": "nvjet_tst_gemm", "per_step": 1.5, "ms_per_step": 0.15},
                {"name": "flash_fwd_kernel", "per_step": 0.5, "ms_per_step": 0.05},
                {"name": "triton_poi_fused_add", "per_step": 0.5, "ms_per_step": 0.01}],
    }
    assert list(window.summary()["by_class"]) == ["gemm", "attention", "elementwise"]  # the costliest first
    window.done = False
    assert window.summary() is None  # a window that never closed has no figures


def test_gpu_check_meter_times_generate_and_counts_transformers_own_decode_forwards(monkeypatch):
    """``GenerationMeter`` wraps ``sc_tune.rollout.generate``: the tokens it writes (the completions' mask), its
    seconds, and on the bare model under PEFT (``watch``) the prefill forwards' seconds and the one-token forwards by
    rows, counted only inside ``generate``; ``pop`` hands the figures over and starts again from zero."""
    from types import SimpleNamespace

    gpu_check = _gpu_check_module(monkeypatch)

    class Model(torch.nn.Module):
        def forward(self, input_ids=None):
            return input_ids

    model = Model()

    def fake_generate(rows, steps, fail=False, prompt=7):
        model(input_ids=torch.zeros(rows, prompt, dtype=torch.long))  # the prefill: any forward of 2 tokens or more
        model()  # a forward without input_ids (embeddings passed instead) is neither
        for _ in range(steps):
            model(input_ids=torch.zeros(rows, 1, dtype=torch.long))
        if fail:
            raise RuntimeError("out of memory")
        mask_BT = torch.ones(rows, steps + 1)
        mask_BT[0, -1] = 0  # a row that ended a token early
        return SimpleNamespace(mask_BT=mask_BT)

    monkeypatch.setattr(sc_tune.rollout, "generate", fake_generate)
    # generate's start, the prefill's start and end, generate's end; per call
    clock = iter([10.0, 10.5, 10.75, 12.0, 20.0, 20.1, 20.4, 21.0, 30.0, 30.2, 30.3])
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    meter = gpu_check.GenerationMeter("cpu")
    meter.watch(SimpleNamespace(get_base_model=lambda: model))  # a PEFT model: the hooks go on the bare one
    model(input_ids=torch.zeros(2, 1, dtype=torch.long))  # before any generate: not the loop's
    assert sc_tune.rollout.generate(2, 3).mask_BT.sum() == 7
    model(input_ids=torch.zeros(2, 7, dtype=torch.long))  # outside generate: not the loop's
    model(input_ids=torch.zeros(2, 1, dtype=torch.long))
    sc_tune.rollout.generate(3, 2, prompt=2)
    assert meter.pop() == {"tokens": 7 + 8, "seconds": pytest.approx(2.0 + 1.0), "prefill_seconds": pytest.approx(0.55),
                           "decode_forwards": 5, "by_rows": {2: 3, 3: 2}}
    assert meter.pop() == {"tokens": 0, "seconds": 0.0, "prefill_seconds": 0.0, "decode_forwards": 0, "by_rows": {}}
    with pytest.raises(RuntimeError, match="out of memory"):
        sc_tune.rollout.generate(4, 1, fail=True)
    model(input_ids=torch.zeros(4, 1, dtype=torch.long))  # after a failed call: outside again
    assert meter.pop() == {"tokens": 0, "seconds": 0.0, "prefill_seconds": pytest.approx(0.1), "decode_forwards": 1,
                           "by_rows": {4: 1}}


def test_gpu_check_profiles_the_decode_steps_it_is_asked_for(monkeypatch):
    """``DecodeProfile`` as a decode-step hook: the profiler starts at step ``first``, covers ``count`` steps and
    stops at the next (or when the loop ends, index None, with the steps it saw); later calls and loops change
    nothing. On CPU its summary is the top-level operators (a nested one is inside its parent's time), and a window
    that recorded nothing says so."""
    from types import SimpleNamespace

    gpu_check = _gpu_check_module(monkeypatch)
    started = []

    class Profiler:
        def __init__(self, activities):
            self.activities, self.entered, self.exited = activities, False, False
            started.append(self)

        def __enter__(self):
            self.entered = True

        def __exit__(self, *exc):
            self.exited = True

        def events(self):
            cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
            top = SimpleNamespace(name="aten::linear", time_range=SimpleNamespace(start=0, end=900), device_type=cpu,
                                  cpu_parent=None)
            return [top,
                    SimpleNamespace(name="aten::mm", time_range=SimpleNamespace(start=100, end=800), device_type=cpu,
                                    cpu_parent=top),
                    SimpleNamespace(name="aten::add", time_range=SimpleNamespace(start=1000, end=1300),
                                    device_type=cpu, cpu_parent=None),
                    SimpleNamespace(name="nvjet_gemm", time_range=SimpleNamespace(start=0, end=50), device_type=cuda,
                                    cpu_parent=None)]

    monkeypatch.setattr(torch.profiler, "profile", Profiler)
    clock = iter([5.0, 5.03])
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    window = gpu_check.DecodeProfile("cpu", first=2, count=3)
    for index in (0, 1):
        window(index)
    assert not started and window.summary() is None
    for index in (2, 3, 4):
        window(index)
    assert len(started) == 1 and started[0].entered and not started[0].exited and window.steps == 3
    window(5)
    assert started[0].exited and window.done and window.wall == pytest.approx(0.03)
    for index in (6, None, 0, 1, 2):  # the rest of the loop, and the next loops
        window(index)
    assert len(started) == 1 and window.steps == 3
    assert started[0].activities == [torch.profiler.ProfilerActivity.CPU]
    assert window.summary() == {
        "steps": 3, "what": "top-level CPU operators", "kernels_per_step": 0.7, "kernel_ms_per_step": 0.4,
        "busy_ms_per_step": 0.4, "wall_ms_per_step": 10.0,
        "by_class": {"gemm": {"ms_per_step": 0.3, "per_step": 0.3},
                     "elementwise": {"ms_per_step": 0.1, "per_step": 0.3}},
        "top": [{"name": "aten::linear", "per_step": 0.3, "ms_per_step": 0.3},
                {"name": "aten::add", "per_step": 0.3, "ms_per_step": 0.1}]}
    # A loop that ends before the window's last step closes it with the steps it saw.
    clock = iter([7.0, 7.01])
    short = gpu_check.DecodeProfile("cpu", first=1, count=4)
    for index in (0, 1, 2, None):
        short(index)
    assert short.done and short.steps == 2 and started[-1].exited and short.wall == pytest.approx(0.01)
    started[-1].events = lambda: []
    assert short.summary() == {"steps": 2, "error": "the profiler recorded no kernels"}
    # The costliest 15 names are listed, costliest first.
    started[-1].events = lambda: [SimpleNamespace(name=f"aten::op{k}", time_range=SimpleNamespace(start=0, end=10 * k),
                                                  device_type=torch.autograd.DeviceType.CPU, cpu_parent=None)
                                  for k in range(1, 18)]
    assert [row["name"] for row in short.summary()["top"]] == [f"aten::op{k}" for k in range(17, 2, -1)]
    # Busy time is the union of the intervals, taken in order of their starts: one inside another adds nothing.
    started[-1].events = lambda: [SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                                                  device_type=torch.autograd.DeviceType.CPU, cpu_parent=None)
                                  for name, start, end in (("aten::mm", 0, 1000), ("aten::add", 100, 200))]
    assert short.summary()["busy_ms_per_step"] == 0.5 and short.summary()["kernel_ms_per_step"] == 0.55


@pytest.mark.parametrize("name, label", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"), ("nvjet_tst_128x64_64x8", "gemm"),
    ("cutlass_80_tensorop_s1688", "gemm"),
    ("aten::addmm", "gemm"), ("aten::bmm", "gemm"), ("aten::linear", "gemm"),
    ("fmha_cutlassF_bf16_aligned_64x64", "attention"), ("flash_fwd_splitkv_kernel", "attention"),
    ("aten::_scaled_dot_product_efficient_attention", "attention"),
    ("at::native::radixSortKVInPlace", "sort"), ("gatherTopK", "sort"),
    ("triton_red_fused_mean_pow_0", "reduction"), ("cunn_SoftMaxForward", "reduction"),
    ("triton_per_fused_add_rms_norm_1", "reduction"),
    ("Memcpy DtoD (Device -> Device)", "copy"), ("indexSelectLargeIndex", "copy"), ("CatArrayBatchedCopy", "copy"),
    ("triton_poi_fused_mul_silu_2", "elementwise"), ("vectorized_elementwise_kernel", "elementwise"),
    ("aten::add", "elementwise"), ("cudaGraphLaunch", "other"),
])
def test_gpu_check_kernel_classes(name, label, monkeypatch):
    """The profile's classes, from kernel names cuBLAS, CUTLASS, flash attention and inductor give (first match wins:
    a CUTLASS attention kernel is attention, an inductor reduction fused with an add is a reduction)."""
    assert _gpu_check_module(monkeypatch).kernel_class(name) == label


def test_gpu_check_times_a_compiled_setting_only_after_its_compiles(capsys, monkeypatch):
    """``compiled``: a call whose cache length or adapters differ from every earlier one compiles again (the
    describer's fused loop is called with a longer cache once locating has run), so one warm-up unit is not enough;
    the warm-up goes on until a unit compiles nothing and the timed units then compile nothing."""
    import torch._dynamo

    gpu_check = _gpu_check_module(monkeypatch)
    torch._dynamo.reset()
    gpu_check.main(["--dry_run", "--configs", "mini-qwen2.5-vl", "--settings", "compiled"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mini-qwen2.5-vl"]
    describer, locator = report["describer_compiled"], report["locator_compiled"]
    assert describer["warmup_units"] >= 2  # one unit would have timed a compilation
    assert describer["compiles_in_timed_units"] == 0 and locator["compiles_in_timed_units"] == 0


def test_count_decode_ops_counts_the_lora_kernels_of_a_fused_step(capsys, monkeypatch):
    """One layer: PEFT's forward of one adapter adds 4 kernels per LoRA layer (two matmuls, scale, add); the fused
    loop's two adapters per row block add 10, stacked and masked 4, batched over the equal blocks 3
    (``sc_tune.snapshot._StackedRowTerms``)."""
    count_decode_ops = _script(monkeypatch, "count_decode_ops")

    count_decode_ops.main(["--layers", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["lora_layers"] == 7  # q, k, v, o, gate, up, down
    assert report["one_adapter"]["lora_kernel_ops_per_layer"] == 4
    assert report["row_adapters_per_block"]["lora_kernel_ops_per_layer"] == 10
    assert report["row_adapters_masked"]["lora_kernel_ops_per_layer"] == 4
    assert report["row_adapters"]["lora_kernel_ops_per_layer"] == 3
    assert report["base"]["kernel_ops"] < report["base"]["ops"]
    assert report["rows"] == 4 and report["layers"] == 1  # two boxes: a sampled and a greedy row each


def test_count_decode_ops_counts_the_second_decode_step_and_only_kernels_as_kernels(monkeypatch):
    """``count_one_step`` counts the operations of a call's second decode step alone (the first warms up, the rest
    repeat it), refuses a call that decoded fewer than two, and puts the loop back; ``OpCounter`` counts every
    dispatched operation, and as kernels those that are not views, allocations or host reads."""
    import sc_tune.decoding

    count_decode_ops = _script(monkeypatch, "count_decode_ops")

    x = torch.ones(3)
    # a loop of ``loop`` steps (the stand-in for sc_tune.decoding._run)
    monkeypatch.setattr(sc_tune.decoding, "_run", lambda step, loop, *rest: [step() for _ in range(loop)])
    steps = iter([lambda: x + 1,  # the first: 1 op
                  # add, mul, view, sum, the host read, an allocation
                  lambda: ((x + 1) * 2).view(3).sum().item() + torch.empty(2).numel(),
                  lambda: [x + k for k in range(5)]])
    counter = count_decode_ops.count_one_step(lambda: sc_tune.decoding._run(lambda: next(steps)(), 3, False, "cpu",
                                                                                None))
    assert (counter.ops, counter.kernel_ops) == (6, 3)
    loop = sc_tune.decoding._run
    with pytest.raises(SystemExit, match="fewer than two steps"):
        count_decode_ops.count_one_step(lambda: sc_tune.decoding._run(lambda: x + 1, 1, False, "cpu", None))
    assert sc_tune.decoding._run is loop


def test_bench_decode_attention_times_both_paths_on_the_same_attention(capsys, monkeypatch):
    """Both compiled paths give the same attention (the script checks it before timing); transformers' reads and
    writes the key/value heads repeated 7 times (Qwen2.5-VL-7B's 28 query heads over 4), SC-Tune's reads them once.
    The shape is the GPU check's 7B; the per-step times and the speed-up are worked from the timings given."""
    bench_decode_attention = _script(monkeypatch, "bench_decode_attention")

    assert bench_decode_attention.QWEN2_5_VL_7B == {"layers": 28, "heads": 28, "kv_heads": 4, "head_dim": 128}
    timed = []  # the compiled paths' figures, from a stand-in clock: 3 ms for transformers', 1.2 ms for SC-Tune's
    monkeypatch.setattr(bench_decode_attention, "_timed", lambda function, inputs, device, repeats: timed.append(
        (inputs[1].shape, inputs[4].shape, int(inputs[4].sum()), repeats)) or (3.0, 1.2)[(len(timed) - 1) % 2])
    bench_decode_attention.main(["--rows", "2", "--cache", "20", "--repeats", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours, theirs = report["sc_tune"], report["transformers_sdpa"]
    # one query token per row; a mask per cache column, the last tenth of each row's masked (not yet written)
    assert timed == [((2, 28, 1, 128), (2, 1, 1, 20), 2 * 18, 1)] * 2
    assert report["backend"] == "aot_eager"  # on CPU
    assert ours["kv_bytes_per_step"] == 28 * 2 * (2 * 4 * 20 * 128) * 4  # layers, keys and values, float32
    assert theirs["kv_bytes_per_step"] == ours["kv_bytes_per_step"] * (1 + 2 * 7)
    assert (theirs["ms_per_layer"], theirs["ms_per_step"], ours["ms_per_layer"], ours["ms_per_step"]) == (
        3.0, 84.0, 1.2, 33.6)
    assert report["speedup"] == 2.5
    # The script refuses to time two paths that attend differently (here by 2e-5, over float32's 1e-5).
    real_path = bench_decode_attention._decode_attention
    monkeypatch.setattr(bench_decode_attention, "_decode_attention",
                        lambda *args, **kwargs: (real_path(*args, **kwargs)[0] + 2e-5, None))
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        bench_decode_attention.main(["--rows", "2", "--cache", "20", "--repeats", "1"])


def test_bench_decode_attention_takes_the_median_after_three_warm_up_calls(monkeypatch):
    """``_timed``: the median milliseconds of the calls after three warm-up calls (the compiled path compiles in
    them), each call given the inputs."""
    from types import SimpleNamespace

    bench_decode_attention = _script(monkeypatch, "bench_decode_attention")

    # six calls: three warm-ups (their starts read, their ends not), then 2, 4 and 3 ms
    clock = iter([0.0, 10.0, 20.0, 30.0, 30.002, 31.0, 31.004, 32.0, 32.003])
    monkeypatch.setattr(bench_decode_attention, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    assert bench_decode_attention._timed(lambda *a: calls.append(a), ("x", "y"), torch.device("cpu"), 3) == \
        pytest.approx(3.0)
    assert calls == [("x", "y")] * 6


@pytest.mark.parametrize("folder", real.present(["Qwen__Qwen2.5-VL-7B-Instruct"], ("tokenizer",)))
def test_bench_box_check_finds_each_row_complete_at_its_box_on_the_released_tokenizer(folder, capsys, monkeypatch):
    """The host check the script times ends every row, at the step where the widest answer's box is complete; its
    figures are the steps' milliseconds (a scripted clock: step k takes k ms)."""
    from tests.helpers import tokens_to_box

    folder = real.path(folder)
    bench_box_check = _script(monkeypatch, "bench_box_check")

    from types import SimpleNamespace

    def clock():  # step k (from 1) of the check takes k ms
        began, step = 100.0, 0
        while True:
            step += 1
            yield began
            began += step / 1000
            yield began

    ticks = clock()
    monkeypatch.setattr(bench_box_check, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    bench_box_check.main(["--rows", "3", "--repeats", "1", "--tokenizer", folder])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    adapter = bench_box_check.released_adapter(folder)
    answers = bench_box_check.locator_answers(adapter, 3)
    assert report["rows_found_complete"] == 3
    steps = report["steps"]
    assert steps == max(tokens_to_box(adapter, answer) for answer in answers) < min(map(len, answers))
    assert report["ms_per_step_max"] == pytest.approx(steps, abs=1e-3)
    assert report["ms_per_step_median"] == pytest.approx((steps + 1) / 2, abs=1e-3)
    assert report["ms_per_call"] == pytest.approx(steps * (steps + 1) / 2, abs=0.1)


def test_diagnose_locator_tells_the_described_object_from_the_others(capsys, monkeypatch, tmp_path):
    """On the committed warm start, whose locator works, boxes land on the described object far above chance; the
    shares of each group add up to 1."""
    from sc_tune.synthetic.shapes import write_split
    from tests.conftest import WARM_START

    diagnose_locator = _script(monkeypatch, "diagnose_locator")

    write_split(tmp_path, "heldout", 12, seed=3)  # 2-4 objects each: at least 24
    diagnose_locator.main(["--checkpoint", WARM_START, "--data", str(tmp_path), "--objects", "20"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    everything = report["all"]
    assert everything["objects"] == 20
    assert report["unique_shape"]["objects"] + report["shared_shape"]["objects"] == 20
    assert sum(everything[k] for k in ("described", "other_object", "none", "unparsed")) == pytest.approx(1, abs=0.01)
    assert everything["described"] > everything["chance"] + 0.3


def test_diagnose_locator_sorts_each_box_by_the_object_it_lands_on(capsys, monkeypatch, tmp_path):
    """Scripted boxes, one of each outcome: on another object of the scene, on the described one, none parsed, on
    nothing (IoU under 0.5 with every object). The scene is every object of the image in the whole held-out file
    (``--objects`` takes the first records only), a shape is unique when no other object of the scene has it, and
    chance is 1 / objects in the scene. The records go to the locator ``--batch`` at a time, in order."""
    from types import SimpleNamespace

    diagnose_locator = _script(monkeypatch, "diagnose_locator")

    records = [{"image": "a.png", "bbox": [0.0, 0.0, 0.2, 0.2], "caption": "the red circle"},
               {"image": "a.png", "bbox": [0.5, 0.5, 1.0, 1.0], "caption": "the blue square"},
               {"image": "b.png", "bbox": [0.1, 0.1, 0.4, 0.4], "caption": "the red triangle"},
               {"image": "a.png", "bbox": [0.8, 0.8, 1.0, 1.0], "caption": "the green circle"},
               {"image": "b.png", "bbox": [0.5, 0.1, 0.9, 0.4], "caption": "the blue star"}]  # past --objects 4
    (tmp_path / "heldout.json").write_text(json.dumps(records))
    boxes = {"the red circle": [0.5, 0.5, 1.0, 0.95],  # the blue square
             "the blue square": [0.5, 0.5, 1.0, 0.75],  # described: IoU 0.5 exactly is a hit, as in Acc@0.5
             "the red triangle": [0.0, 0.6, 0.3, 0.9],  # nothing there
             "the green circle": None}  # unparsed
    calls = []

    def locate(model, adapter, images, captions, settings):
        calls.append((images, captions))
        return [boxes[c] for c in captions], None

    monkeypatch.setattr(diagnose_locator, "load_model_and_adapter", lambda checkpoint: (
        SimpleNamespace(eval=lambda: None), SimpleNamespace(prepare_image=lambda image: f"prepared {image}")))
    monkeypatch.setattr(diagnose_locator, "load_rgb", lambda path: os.path.basename(path))
    monkeypatch.setattr(diagnose_locator, "locate", locate)
    diagnose_locator.main(["--checkpoint", "ckpt", "--data", str(tmp_path), "--objects", "4", "--batch", "3"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls == [(["prepared a.png", "prepared a.png", "prepared b.png"],
                      ["the red circle", "the blue square", "the red triangle"]),
                     (["prepared a.png"], ["the green circle"])]
    quarter = dict(described=0.25, other_object=0.25, none=0.25, unparsed=0.25)
    assert report == {
        "checkpoint": "ckpt",
        "all": {"objects": 4, "chance": 0.375, **quarter},  # scenes of 3, 3, 2 and 3 objects
        "unique_shape": {"objects": 2, "chance": 0.417, "described": 0.5, "other_object": 0.0, "none": 0.5,
                         "unparsed": 0.0},  # the square (of 3) and the triangle (of 2)
        "shared_shape": {"objects": 2, "chance": 0.333, "described": 0.0, "other_object": 0.5, "none": 0.0,
                         "unparsed": 0.5},  # the two circles
    }


def test_bench_memory_measures_both_snapshot_kinds(capsys, monkeypatch):
    """One process per snapshot kind, each through a describer unit: the LoRA snapshot holds a fraction of what the
    full copy holds (the script stopped at the preflight before it said it skips it); each holds what trains, in
    float32."""
    bench_memory = _script(monkeypatch, "bench_memory")

    bench_memory.main(["--sizes", "toy-qwen2.5-vl"])
    full, lora = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (full["snapshot"], lora["snapshot"]) == ("full copy", "LoRA adapter")
    assert 0 < lora["snapshot_mib"] < full["snapshot_mib"] / 3 and lora["trainable_m"] < full["trainable_m"]
    assert 100 < full["peak_rss_mib"] < 16384 and 100 < lora["peak_rss_mib"] < 16384  # MiB: torch alone is ~300
    # Either snapshot holds a float32 copy of what trains, and nothing more (the figures rounded as printed) ...
    for row in (full, lora):
        assert row["snapshot_mib"] == pytest.approx(row["trainable_m"] * 1e6 * 4 / 2**20, abs=0.1), row
    # ... and the LoRA model is the base with two adapters of the same size, the policy's and the snapshot's.
    assert lora["parameters_m"] == pytest.approx(full["parameters_m"] + 2 * lora["trainable_m"], abs=0.1)


def test_device_summary_reads_the_device_runs_figures_and_judges_the_targets(tmp_path, monkeypatch, capsys):
    """``scripts/device_summary.py`` on a device run's outputs: the acceptance figures of ``describer_fast``, the
    compiled setting and the profiles carried along, each target applied, and ``null`` for what no stage printed."""
    import subprocess

    device_summary = _script(monkeypatch, "device_summary")

    profile = {"steps": 8, "kernels_per_step": 1826.0, "kernel_ms_per_step": 9.0, "busy_ms_per_step": 9.5,
               "wall_ms_per_step": 12.0, "by_class": {"gemm": {"ms_per_step": 4.0, "per_step": 400.0}},
               "top": [{"name": "nvjet_tst", "per_step": 200.0, "ms_per_step": 3.0}]}

    def write(tokens_per_s, ratio, batch=64):
        fast = {"new_tokens_per_s": tokens_per_s, "decode_ms_per_step": 8.0, "weight_read_floor_ms": 3.5,
                "decode_floor_ratio": ratio, "generation_batch_size": batch, "graph_failures": 0,
                "step_seconds": 3.0, "profile": profile}
        fast = {key: value for key, value in fast.items() if value is not None}  # a figure the stage did not print
        compiled = {**fast, "new_tokens_per_s": 2500.0, "decode_floor_ratio": 2.0, "compiles_in_timed_units": 0}
        lines = [f"qwen2.5-vl-7b describer_fast: {json.dumps(fast)}",
                 f"qwen2.5-vl-7b describer_transformers: {json.dumps({'new_tokens_per_s': 300.0, 'step_seconds': 7.0})}",
                 f"qwen2.5-vl-7b describer_compiled: {json.dumps(compiled)}",
                 f"qwen2.5-vl-7b locator_fast: {json.dumps({'new_tokens_per_s': 900.0})}"]
        (tmp_path / "2_real_size.txt").write_text("noise\n" + "\n".join(lines) + "\n")
        return device_summary.summary(str(tmp_path))

    met = write(2100.0, 2.4)
    assert met["acceptance_met"] is True and met["describer_new_tokens_per_s"] == 2100.0
    assert met["describer_fast_profile"] == {k: v for k, v in profile.items() if k != "top"}
    assert met["describer_compiled_new_tokens_per_s"] == 2500.0 and met["describer_compiled_compiles_in_timed_units"] == 0
    assert met["locator_new_tokens_per_s"] == 900.0 and met["side_by_side_describer_ratio"] is None
    assert met["decode_attention_ms_per_step"] is None
    assert met["describer_transformers_new_tokens_per_s"] == 300.0
    assert met["describer_speedup_vs_transformers_loop"] == 2.333  # 7.0 s / 3.0 s, to 3 decimals
    (tmp_path / "2b_decode_attention.txt").write_text(
        "sc_tune: ...\n" + json.dumps({"transformers_sdpa": {"ms_per_step": 9.1}, "sc_tune": {"ms_per_step": 1.2}}))
    assert device_summary.summary(str(tmp_path))["decode_attention_ms_per_step"] == {"transformers_sdpa": 9.1,
                                                                                      "sc_tune": 1.2}
    assert write(2000.0, 2.5)["acceptance_met"] is True  # the targets themselves: "≥ 2,000" and "≤ 2.5"
    assert write(1999.0, 2.4)["acceptance_met"] is False
    assert write(2100.0, 2.6)["acceptance_met"] is False
    assert write(2100.0, 2.4, batch=32)["acceptance_met"] is False
    assert write(2100.0, None)["acceptance_met"] is None  # one of the two figures alone is not a measurement
    assert write(None, 2.4)["acceptance_met"] is None
    write(2100.0, 2.4)  # the command: the figures printed on one line and written beside the outputs
    device_summary.main([str(tmp_path)])
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith("acceptance {")
    assert json.loads(printed.removeprefix("acceptance ")) == json.loads((tmp_path / "acceptance.json").read_text())
    assert json.loads((tmp_path / "acceptance.json").read_text())["acceptance_met"] is True
    only_fast = (tmp_path / "2_real_size.txt").read_text().splitlines()[1]  # transformers' loop not run: no speedup
    (tmp_path / "2_real_size.txt").write_text(only_fast + "\n")
    assert device_summary.summary(str(tmp_path))["describer_speedup_vs_transformers_loop"] is None
    assert device_summary.summary(str(tmp_path))["acceptance_met"] is True
    (tmp_path / "2_real_size.txt").unlink()
    assert device_summary.summary(str(tmp_path))["acceptance_met"] is None  # not measured, never "not met"
    # the device script itself parses under dash, the /bin/sh of the machines it runs on
    assert subprocess.run(["sh", "-n", f"{ROOT}/scripts/device_check.sh"]).returncode == 0


def test_bench_vision_cache_runs_both_arms_and_the_on_arm_encodes_each_view_once(capsys, monkeypatch):
    """One run per arm on the tiny MiniCPM-V 4.6 (each sample image a thumbnail and 4 slices, the cache's units): the
    arms make the same tower calls and train to the same losses, and with the cache on the trunk encodes each view at
    most once in the unit's one rollout while the frozen snapshot's tower answers calls from its memo; an "on" arm
    that never used the cache would make the loss comparison a comparison of the off arm with itself."""
    from tests.helpers import FAST

    bench_vision_cache = _script(monkeypatch, "bench_vision_cache")

    bench_vision_cache.main(["--model_type", "minicpmv4_6", "--runs", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) == {"model_type", "vision_layers", "off_s", "on_s", "runs", "tower_calls", "losses",
                           "cache_images_encoded", "cache_calls_from_memo"}
    assert (report["model_type"], report["vision_layers"]) == ("minicpmv4_6", None)
    assert [len(report["runs"][arm]) for arm in ("False", "True")] == [1, 1]
    assert report["off_s"] > 0 and report["on_s"] > 0
    assert report["tower_calls"]["True"] == report["tower_calls"]["False"] > 0
    losses = report["losses"]
    assert len(losses["False"]) == 2 and all(loss != 0 for loss in losses["False"])  # max_steps=2: two PPO steps
    assert losses["True"] == losses["False"]
    assert 0 < report["cache_images_encoded"] <= FAST["per_device_train_batch_size"] * (1 + 4)  # views per image
    assert 0 < report["cache_calls_from_memo"] < report["tower_calls"]["True"]  # not the first: nothing was cached


def test_bench_prompt_cache_skips_the_greedy_prefill_and_each_locator_rows_image_span(capsys, monkeypatch, tmp_path):
    """One timed unit per setting on a tiny InternVL whose 112 px tile is 16 image tokens: with the reuse the greedy
    captions decode from the scoring cache (no prefill at all) and the 2B locator rows prefill only what follows the
    image prefix (at least 16 columns a row fewer), with the same locator answers as full prefills."""
    from sc_tune.tiny.template_families import save_tiny_template_family

    folder = save_tiny_template_family("internvl", str(tmp_path), image_size=112)
    bench_prompt_cache = _script(monkeypatch, "bench_prompt_cache")

    batch = 2
    bench_prompt_cache.main(["--units", "1", "--batch", str(batch), "--checkpoint", folder])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) == {"model_type", "image_tokens", "batch", "units", "reuse_off", "reuse_on",
                           "same_locator_answers"}
    assert (report["model_type"], report["image_tokens"], report["batch"], report["units"]) == ("internvl", 16, 2, 1)
    off, on = report["reuse_off"], report["reuse_on"]
    for figures in (off, on):
        assert set(figures) == {"prefill_s", "stages_s", "greedy_prefill_columns", "locating_prefill_columns",
                                "locator_texts"}
        assert 0 < figures["prefill_s"] < figures["stages_s"]
        assert len(figures["locator_texts"]) == 2 * batch and any(figures["locator_texts"])
    assert off["greedy_prefill_columns"] > batch * report["image_tokens"] and on["greedy_prefill_columns"] == 0
    assert 0 < on["locating_prefill_columns"] <= off["locating_prefill_columns"] - 2 * batch * report["image_tokens"]
    assert on["locator_texts"] == off["locator_texts"] and report["same_locator_answers"] is True
