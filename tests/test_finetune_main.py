"""finetune.py's own decisions, between the parsed flags and the trainer: the weights' dtype, the QLoRA refusal, the log
level; the model loader is replaced by a recorder that ends the run where the weights would load."""

import logging
import sys

import pytest
import torch

from sc_tune.arguments import ArgumentError
from tests.conftest import SAMPLE_DATA, SAMPLE_IMAGES


class _Loaded(Exception):
    """Raised by the recording loader: the run got as far as loading the weights."""


def _loading_kwargs(monkeypatch, tiny_checkpoint, tmp_path, *flags) -> dict:
    import finetune

    recorded = {}

    def record(path, **kwargs):
        recorded.update(kwargs, path=path)
        raise _Loaded

    monkeypatch.setattr(finetune, "load_model_and_adapter", record)
    with pytest.raises(_Loaded):
        finetune.main(["--model_name_or_path", tiny_checkpoint("qwen2_vl"), "--data_path", SAMPLE_DATA,
                       "--image_folder", SAMPLE_IMAGES, "--output_dir", str(tmp_path / "out"), "--use_cpu", "True",
                       "--report_to", "none", *flags])
    return recorded


@pytest.mark.parametrize("flags, dtype", [
    ([], torch.float32),
    # A plain run keeps fp32 weights and --bf16 autocasts the compute: Adam's 5e-7 steps would vanish in bf16 weights.
    (["--bf16", "True"], torch.float32),
    # LoRA trains fp32 adapters on a frozen base: the base may be loaded in half precision, if asked for.
    (["--bf16", "True", "--use_lora", "True"], torch.bfloat16),
    (["--use_lora", "True"], torch.float32),
])
def test_the_weights_load_in_half_precision_only_where_fp32_master_weights_live_elsewhere(
        monkeypatch, tiny_checkpoint, tmp_path, flags, dtype):
    loaded = _loading_kwargs(monkeypatch, tiny_checkpoint, tmp_path, *flags)
    assert loaded["dtype"] == dtype
    assert loaded["quantization_config"] is None
    assert loaded["path"] == tiny_checkpoint("qwen2_vl")


def test_the_model_is_loaded_with_the_box_format_and_pixel_bounds_asked_for(monkeypatch, tiny_checkpoint, tmp_path):
    loaded = _loading_kwargs(monkeypatch, tiny_checkpoint, tmp_path, "--box_format", "generic",
                             "--image_min_pixels", "3136", "--image_max_pixels", "12544")
    assert (loaded["box_format"], loaded["image_min_pixels"], loaded["image_max_pixels"]) == ("generic", 3136, 12544)


def test_qlora_without_lora_is_refused_before_anything_loads(monkeypatch, tiny_checkpoint, tmp_path):
    import finetune

    monkeypatch.setattr(finetune, "load_model_and_adapter", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ArgumentError, match=r"^--q_lora needs --use_lora$"):
        finetune.main(["--model_name_or_path", tiny_checkpoint("qwen2_vl"), "--data_path", SAMPLE_DATA,
                       "--output_dir", str(tmp_path / "out"), "--use_cpu", "True", "--q_lora", "True"])
    assert not (tmp_path / "out").exists()  # nothing written, no lock left


def test_qlora_with_lora_loads_four_bit_weights_computing_in_the_half_dtype(monkeypatch, tiny_checkpoint, tmp_path):
    loaded = _loading_kwargs(monkeypatch, tiny_checkpoint, tmp_path, "--use_lora", "True", "--q_lora", "True",
                             "--bf16", "True")
    config = loaded["quantization_config"]
    assert config is not None and config.load_in_4bit and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert loaded["dtype"] == torch.bfloat16


def test_the_command_reads_every_word_after_the_script(monkeypatch, tmp_path):
    import finetune

    monkeypatch.setattr(sys, "argv", ["finetune.py", "--seed", "7", "--output_dir", str(tmp_path), "--use_cpu", "True"])
    *_, args, notes = finetune.parse_args()
    assert (args.seed, args.output_dir, notes) == (7, str(tmp_path), [])


def test_the_first_process_logs_at_info(monkeypatch, tiny_checkpoint, tmp_path):
    """Process 0 logs its progress (the records read, the trainable parameters) at INFO, the others warnings only.
    Recorded from ``logging.basicConfig``'s arguments: under pytest, whose handlers the root logger already has, the
    call itself changes nothing."""
    configured = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: configured.append(kwargs))
    _loading_kwargs(monkeypatch, tiny_checkpoint, tmp_path)
    assert [kwargs["level"] for kwargs in configured] == [logging.INFO]
