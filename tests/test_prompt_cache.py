"""The snapshot's greedy captions may start from its scoring pass's prompt cache: exact, and really used.

``--snapshot_prompt_cache`` (on by default) lets the describer rollout skip one prompt prefill: the snapshot scores
the sampled captions (prompt + caption, teacher-forced), keeps that pass's key/value cache cropped to the prompt,
and decodes its greedy captions from it. These tests pin that the captions, their logits and the training losses
equal those of a fresh prefill, and that the fresh prefill is really skipped (else the option would be a no-op).
"""

import pytest
import torch

import sc_tune.trainer
from sc_tune.modeling import freeze_vision_tower, load_model_and_adapter
from sc_tune.rollout import GenerationSettings, describe, generate, keep_prompt_columns
from tests.helpers import sample_images, small_lora, two_phase_trainer

GREEDY = GenerationSettings(max_new_tokens=8)
SAMPLED = GenerationSettings(max_new_tokens=8, do_sample=True, top_k=50, top_p=1.0)


def _scored_prompt_cache(model, adapter, batch, sampled):
    """What the trainer's scoring pass leaves: the cache of prompt + sampled caption, cropped to the prompt - 1."""
    teacher = adapter.append_completion(batch, sampled.ids_BT, sampled.mask_BT)
    outputs = model(**teacher, use_cache=True)
    return keep_prompt_columns(outputs.cache, batch.inputs["input_ids"].shape[1])


class _ForwardWidths:
    """Records the width of input_ids of every forward call of a model."""

    def __init__(self, model):
        self.widths = []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.widths.append(ids.shape[1])


RESUMING_FAMILIES = ["qwen", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("model_type", RESUMING_FAMILIES)
def test_greedy_decoding_from_the_scoring_cache_equals_a_fresh_prefill(tiny_checkpoint, model_type):
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    model.eval()
    assert adapter.resumes_from_scoring_cache(model, 300, 330)
    images, boxes = sample_images(adapter)
    boxes[1] = [0.5, 0.5, 0.51, 0.52]  # other digits: prompts of different lengths, so rows are left-padded
    batch, sampled = describe(model, adapter, images, boxes, SAMPLED)
    assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "the test needs left padding"
    fresh = generate(model, adapter, batch, GREEDY, skip_special_tokens=True)

    cache = _scored_prompt_cache(model, adapter, batch, sampled)
    widths = _ForwardWidths(model)
    resumed = generate(model, adapter, batch, GREEDY, skip_special_tokens=True, prompt_cache=cache)
    widths.handle.remove()
    assert widths.widths[0] == 1, "decoding did not start from the cache: the prompt was prefilled again"
    assert torch.equal(resumed.ids_BT, fresh.ids_BT) and resumed.texts == fresh.texts

    # Stronger than equal argmaxes: every step's logits agree.
    width = batch.inputs["input_ids"].shape[1]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True, "output_logits": True,
              "pad_token_id": adapter.pad_token_id}
    plain = model.generate(**batch.inputs, **kwargs)
    cache = _scored_prompt_cache(model, adapter, batch, sampled)
    cached = model.generate(**adapter.resumed_decoding_inputs(batch.inputs), **kwargs, cache=cache)
    assert torch.equal(plain.sequences[:, width:], cached.sequences[:, width:])
    for step_plain, step_cached in zip(plain.logits, cached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_plain, rtol=0, atol=1e-5)


def test_a_cache_of_the_wrong_length_is_refused(tiny_checkpoint):
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen"))
    model.eval()
    images, boxes = sample_images(adapter, n=2)
    batch, sampled = describe(model, adapter, images, boxes, SAMPLED)
    cache = _scored_prompt_cache(model, adapter, batch, sampled)
    cache.crop(-1)
    with pytest.raises(ValueError, match="prompt_cache holds"):
        generate(model, adapter, batch, GREEDY, skip_special_tokens=True, prompt_cache=cache)


def _losses_and_resumed_calls(checkpoint, tmp_path, monkeypatch, prompt_cache: bool, lora=False, checkpointing=False):
    """The four steps' losses, and per describer rollout whether its greedy captions resumed from the cache: the
    trainer's logged ``describer/prompt_cache``, checked against what the trainer really handed ``generate``."""
    handed = []

    def recording_generate(*args, **kwargs):
        handed.append(kwargs.get("prompt_cache") is not None)
        return generate(*args, **kwargs)

    monkeypatch.setattr(sc_tune.trainer, "generate", recording_generate)
    trainer, losses = two_phase_trainer(checkpoint, str(tmp_path / f"{prompt_cache}_{lora}_{checkpointing}"),
                                        model_transform=small_lora if lora else None,
                                        snapshot_prompt_cache=prompt_cache, gradient_checkpointing=checkpointing)
    trainer.train()
    resumed = [entry["describer/prompt_cache"] == 1.0 for entry in trainer.state.log_history
               if "describer/prompt_cache" in entry]
    assert [r for r in resumed if r] == [h for h in handed if h], "the logged metric says what generate was given"
    return losses, resumed


# LoRA with gradient checkpointing is the GPU recipe: the snapshot (the policy's modules, another adapter) must
# still keep its scoring pass's cache there, which it can only in eval mode.
@pytest.mark.parametrize(
    "model_type,lora,checkpointing",
    [("qwen", False, False), ("qwen", True, False), ("qwen", True, True), ("qwen2_5_vl", False, False)],
)
def test_training_losses_identical_with_and_without_the_prompt_cache(
    tiny_checkpoint, tmp_path, monkeypatch, model_type, lora, checkpointing
):
    checkpoint = tiny_checkpoint(model_type)
    plain, plain_resumed = _losses_and_resumed_calls(checkpoint, tmp_path, monkeypatch, False, lora, checkpointing)
    cached, cached_resumed = _losses_and_resumed_calls(checkpoint, tmp_path, monkeypatch, True, lora, checkpointing)
    assert plain_resumed == [False, False] and cached_resumed == [True, True]
    assert len(plain) == 4 and all(loss != 0 for loss in plain)
    assert cached == pytest.approx(plain, abs=1e-5)


def test_families_that_do_not_opt_in_prefill_again(tiny_checkpoint, tmp_path, monkeypatch):
    # Qwen3.5's linear-attention layers keep a recurrent state that cannot be cropped back to the prompt.
    _, resumed = _losses_and_resumed_calls(tiny_checkpoint("qwen3_5"), tmp_path, monkeypatch, True)
    assert resumed == [False, False]


def test_no_reuse_where_dynamic_ntk_would_scale_the_scored_sequence(tiny_checkpoint):
    model, adapter = load_model_and_adapter(tiny_checkpoint("qwen"))
    freeze_vision_tower(model, adapter)
    seq_length = model.config.seq_length
    assert adapter.resumes_from_scoring_cache(model, seq_length - 10, seq_length)
    assert not adapter.resumes_from_scoring_cache(model, seq_length - 10, seq_length + 10)
