"""Configuration of Qwen-VL / Qwen-VL-Chat, field for field as in the official ``config.json``.

The official folder's ``config.json`` loads unchanged (``model_type`` ``"qwen"``, its ``auto_map`` kept so
that an exported folder still opens with the official remote code). ``visual`` stays a plain dict, as in
the official file; ``n_queries`` (resampler queries = image positions in the text, 256 when absent) is an
optional extra key the official ``VisionTransformer`` also accepts.
"""

from __future__ import annotations

from transformers import PretrainedConfig

DEFAULT_VISUAL = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
}
DEFAULT_IMAGE_QUERIES = 256


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        emb_dropout_prob=0.0,
        attn_dropout_prob=0.0,
        layer_norm_epsilon=1e-6,
        initializer_range=0.02,
        max_position_embeddings=8192,
        scale_attn_weights=True,
        use_cache=True,
        bf16=False,
        fp16=False,
        fp32=False,
        kv_channels=128,
        rotary_pct=1.0,
        rotary_emb_base=10000,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        use_flash_attn="auto",
        intermediate_size=22016,
        no_bias=True,
        seq_length=2048,
        visual=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        # bf16/fp16/fp32 are the official precision switches; this implementation follows ``dtype=`` instead
        # and keeps them only so that the file round-trips for the official code.
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.no_bias = no_bias
        self.seq_length = seq_length
        self.visual = dict(DEFAULT_VISUAL if visual is None else visual)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"Qwen-VL config: kv_channels * num_attention_heads ({self.kv_channels} * "
                f"{self.num_attention_heads}) must equal hidden_size ({self.hidden_size}); the official attention "
                "splits c_attn's output by hidden_size"
            )
        if self.visual["output_dim"] != self.hidden_size or self.visual["output_dim"] < 128:
            raise ValueError(
                f"Qwen-VL config: visual.output_dim ({self.visual['output_dim']}) must equal hidden_size "
                f"({self.hidden_size}) and be >= 128 (the resampler has output_dim // 128 heads)"
            )

    @property
    def image_start_id(self) -> int:
        return int(self.visual["image_start_id"])

    @property
    def image_queries(self) -> int:
        """Image positions between ``<img>`` and ``</img>`` (one per resampler query)."""
        return int(self.visual.get("n_queries", DEFAULT_IMAGE_QUERIES))
