"""Routing a config's attention for a block (``attention_routed``) and each text layer's cache kind
(``text_layer_caches``), on transformers' own configs and mask builder."""

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, MistralConfig, Qwen2Config
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask

from sc_tune.attention import WINDOW_LAYER_KINDS, attention_routed, text_layer_caches


def _config(implementation: str = "sdpa") -> LlamaConfig:
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)
    config._attn_implementation = implementation
    return config


def _attention(*args, **kwargs):
    raise AssertionError("never called: the tests read the registration, not a forward")


def test_the_config_names_the_routed_attention_inside_the_block_only():
    config = _config()
    with attention_routed(config, "test_routed", _attention, lambda current: current == "sdpa"):
        assert config._attn_implementation == "test_routed"
        assert AttentionInterface()["test_routed"] is _attention
    assert config._attn_implementation == "sdpa"
    # Restored when the block fails too: a model left on the routed attention would run it everywhere after.
    with pytest.raises(RuntimeError, match="inside"):
        with attention_routed(config, "test_routed", _attention, lambda current: True):
            raise RuntimeError("inside")
    assert config._attn_implementation == "sdpa"


def test_an_implementation_the_route_does_not_apply_to_or_no_config_is_left_alone():
    config = _config("eager")
    asked = []
    with attention_routed(config, "test_not_applied", _attention, lambda current: asked.append(current) or False):
        assert config._attn_implementation == "eager"
    assert asked == ["eager"] and "test_not_applied" not in AttentionInterface()
    # No config (a model part without one), or a config that names no implementation: nothing to route or restore.
    with attention_routed(None, "test_none", _attention, lambda current: True):
        pass
    unnamed = type("Unnamed", (), {})()
    with attention_routed(unnamed, "test_none", _attention, lambda current: True):
        assert not hasattr(unnamed, "_attn_implementation")
    assert "test_none" not in AttentionInterface()


def test_masks_built_while_routed_are_the_mask_functions():
    """transformers builds no mask at all for an attention name without a mask function (its rule for custom
    attention), so a padded batch would attend to its padding; with ``mask_function`` the routed name's masks are
    SDPA's."""
    config = _config()
    embeds = torch.zeros(2, 4, 8)
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    expected = create_causal_mask(config, embeds, padding, None)
    assert expected is not None and expected.shape == (2, 1, 4, 4) and not expected[0, 0, 3, 0]
    with attention_routed(config, "test_with_mask", _attention, lambda current: True, mask_function=sdpa_mask):
        assert AttentionMaskInterface()["test_with_mask"] is sdpa_mask
        assert torch.equal(create_causal_mask(config, embeds, padding, None), expected)
    with attention_routed(config, "test_without_mask", _attention, lambda current: True):
        assert "test_without_mask" not in AttentionMaskInterface()
        assert create_causal_mask(config, embeds, padding, None) is None


def test_each_text_layers_cache_kind_and_window_are_transformers():
    assert text_layer_caches(_config()) == [("full_attention", None)] * 2
    # A sliding window and no layer types (Mistral's text models: Idefics2, LLaVA-NeXT-Mistral): every layer a window.
    mistral = MistralConfig(num_hidden_layers=3, sliding_window=4096)
    assert text_layer_caches(mistral) == [("sliding_attention", 4096)] * 3
    # Layer types given: each layer's own, the window only on window layers.
    qwen2 = Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=64, max_window_layers=1,
                        layer_types=["full_attention", "sliding_attention", "full_attention"])
    assert text_layer_caches(qwen2) == [("full_attention", None), ("sliding_attention", 64), ("full_attention", None)]
    assert set(WINDOW_LAYER_KINDS) == {"sliding_attention", "chunked_attention"}


def test_a_composite_configs_text_layers_are_read():
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig(text_config={"num_hidden_layers": 3, "hidden_size": 16, "num_attention_heads": 2,
                                        "num_key_value_heads": 1, "intermediate_size": 32})
    assert [kind for kind, _ in text_layer_caches(config)] == ["full_attention"] * 3
