"""The GPU check runs end to end on CPU (``--dry_run``): real sizes built on the meta device, then every setting it
times, at toy size, through the same trainer path the GPU run takes (LoRA, gradient checkpointing)."""

import json
import sys

import sc_tune.rollout
from tests.conftest import ROOT


def test_gpu_check_dry_run_times_every_setting_and_sees_the_prompt_cache_engage(capsys, monkeypatch):
    monkeypatch.syspath_prepend(f"{ROOT}/scripts")
    # the script wraps ``generate`` to count tokens; this puts the original back after the test
    monkeypatch.setattr(sc_tune.rollout, "generate", sc_tune.rollout.generate)
    sys.modules.pop("gpu_check", None)
    import gpu_check

    gpu_check.main(["--dry_run", "--prompt_cache_ab"])
    out = capsys.readouterr().out
    assert "[meta] qwen2.5-vl-7b: 8.45 B parameters" in out and "[meta] qwen-vl-chat: 9.77 B parameters" in out
    report = json.loads(out.strip().splitlines()[-1])["toy-qwen-vl-chat"]
    for key in ("describer_cache_on", "describer_cache_off", "describer_prompt_cache_off", "locator_cache_on",
                "locator_cache_off"):
        assert report[key]["step_seconds"] > 0 and report[key]["generated_tokens_per_second"] > 0, key
    assert report["describer_cache_on"]["stages_per_step"]["vision_encoding"] > 0
    assert "vision_encoding" not in report["describer_cache_off"]["stages_per_step"]
    # The GPU recipe (LoRA snapshot, checkpointing) must really decode from the prompt cache, and not when told not to.
    assert report["describer_cache_on"]["prompt_cache_engaged"] is True
    assert report["describer_prompt_cache_off"]["prompt_cache_engaged"] is False
    assert report["describer_cache_on"]["locating_prefix_engaged"] is True
    assert report["describer_prompt_cache_off"]["locating_prefix_engaged"] is False
