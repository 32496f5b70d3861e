"""Qwen-VL / Qwen-VL-Chat language model (QWen-7B with the vision tower spliced into its input).

Written against transformers 5 (``cache=``, ``GenerationMixin``, meta-device loading). Module names equal
the official ones, so the official state dict loads without renaming and ``save_pretrained`` writes it back
in the same layout: ``transformer.wte``, ``transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1,
mlp.w2, mlp.c_proj}``, ``transformer.ln_f``, ``transformer.visual.*``, ``lm_head``.

Behaviour kept from the official model (so that logits agree with it):

- rotary positions are column indices of the (left-padded) batch, as in the official code; RoPE is
  relative, so padding does not change attention between real tokens. One addition: ``position_offsets``
  (B,) shifts each row's positions, for a batch that resumes from cached columns moved in from another batch
  (``sc_tune.prompt_cache``); without it the model is the official one;
- dynamic NTK at inference: the rotary base is scaled by ``alpha ** (d / (d - 2))`` with
  ``alpha = max(2 ** ceil(log2(L / seq_length) + 1) - 1, 1)`` for a prompt of ``L`` tokens, and kept for the
  tokens generated after it (stored on the cache); training uses ``alpha = 1``;
- logn attention at inference: queries at position ``p > seq_length`` are scaled by ``log_seq_length(p)``;
- the SwiGLU MLP gates with ``w2``: ``c_proj(w1(x) * silu(w2(x)))``.

Images: the caller passes ``images`` (``(N_images, 3, S, S)`` pixels from :mod:`.image_processing`) and the
text holds, per image, ``<img>`` + ``n_queries`` placeholder ids + ``</img>``; the placeholders' embeddings
are replaced by the image features, in reading order. What the placeholders hold (the official tokenizer
writes the image path's bytes there) is irrelevant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from sc_tune.models.qwen_vl.configuration import QWenConfig
from sc_tune.models.qwen_vl.visual import Resampler, VisionTransformer


def ntk_alpha_for(length: int, seq_length: int) -> float:
    """The official dynamic-NTK factor for a context of ``length`` tokens."""
    context_value = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def rotary_cos_sin(positions: torch.Tensor, dim: int, base: float, ntk_alpha: float):
    """(cos, sin) in fp32, the official ``[freqs, freqs]`` layout: (1, 1, T, dim) for the positions (T,) that all
    rows share, (B, 1, T, dim) for per-row positions (B, T)."""
    scaled_base = base * ntk_alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / (scaled_base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    emb_BTD = emb if emb.dim() == 3 else emb[None]
    return emb_BTD.cos()[:, None], emb_BTD.sin()[:, None]


def apply_rotary(x_BHTD: torch.Tensor, cos, sin) -> torch.Tensor:
    x = x_BHTD.float()
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x * cos + rotated * sin).type_as(x_BHTD)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=not config.no_bias)
        self.c_proj.is_residual_projection = True
        self.attn_dropout_prob = config.attn_dropout_prob

    def forward(self, hidden_BTC, cos, sin, mask_B1TS, cache: Cache | None, logn_B1T1: torch.Tensor | None):
        batch, length, _ = hidden_BTC.shape
        q, k, v = self.c_attn(hidden_BTC).split(self.hidden_size, dim=2)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if logn_B1T1 is not None:
            q = q * logn_B1T1.to(q.dtype)
        dropout = self.attn_dropout_prob if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TS, dropout_p=dropout)
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, self.hidden_size))


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)
        self.c_proj.is_residual_projection = True

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_BTC, cos, sin, mask_B1TS, cache=None, logn_B1T1=None):
        hidden_BTC = hidden_BTC + self.attn(self.ln_1(hidden_BTC), cos, sin, mask_B1TS, cache, logn_B1T1)
        return hidden_BTC + self.mlp(self.ln_2(hidden_BTC))


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock", "VisualAttentionBlock"]
    _supports_sdpa = True
    # Buffers some exported checkpoints carry; they hold nothing this implementation needs.
    _keys_to_ignore_on_load_unexpected = [r"attn\.masked_bias", r"rotary_emb\.inv_freq", r"attn\.bias$"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, VisionTransformer):
            width = module.positional_embedding.shape[1]
            init.normal_(module.positional_embedding, std=width**-0.5)
            init.normal_(module.proj, std=module.proj.shape[0] ** -0.5)
        elif isinstance(module, Resampler):
            init.copy_(module.pos_embed, module.fixed_positions())
            init.trunc_normal_(module.query, std=0.02)
        elif isinstance(module, nn.Linear) and getattr(module, "is_residual_projection", False):
            # As in the official init: residual output projections are scaled down with depth.
            init.normal_(module.weight, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        if config.rotary_pct != 1.0:
            raise ValueError("Qwen-VL config: only rotary_pct = 1.0 (every official checkpoint) is supported")
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(**config.visual)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def _splice_images(self, input_ids_BT, embeds_BTC, images):
        """Replace each ``<img>`` span's placeholder embeddings with that image's features."""
        if images is None and input_ids_BT.shape[1] == 1:
            # A one-token decode step holds no span (generation never writes <img>, a suppressed media token), and a
            # step captured as a CUDA graph must not search its tokens on the host.
            return embeds_BTC
        start_id = self.config.image_start_id
        starts = (input_ids_BT == start_id).nonzero().tolist()
        ends = (input_ids_BT == start_id + 1).nonzero().tolist()
        if not starts and not ends:
            return embeds_BTC
        n_queries = self.config.image_queries
        if images is None:
            raise ValueError(
                f"Qwen-VL forward: input_ids hold {len(starts)} <img> span(s) but no `images` were passed; pass "
                "(N_images, 3, S, S) pixels from QWenVLImageProcessor"
            )
        if len(starts) != len(ends) or len(starts) != images.shape[0]:
            raise ValueError(
                f"Qwen-VL forward: {len(starts)} <img> and {len(ends)} </img> tokens for {images.shape[0]} images; "
                "each image needs exactly one <img> ... </img> span"
            )
        span_mask_BT = torch.zeros_like(input_ids_BT, dtype=torch.bool)
        for (row, a), (row_end, b) in zip(starts, ends):
            if row != row_end or b - a - 1 != n_queries:
                raise ValueError(
                    f"Qwen-VL forward: the <img> span at row {row}, column {a} has {b - a - 1} positions (or ends in "
                    f"another row); the model expects {n_queries}"
                )
            span_mask_BT[row, a + 1 : b] = True
        features_NQC = self.visual(images).to(embeds_BTC.dtype)
        return embeds_BTC.masked_scatter(span_mask_BT.unsqueeze(-1), features_NQC.reshape(-1, features_NQC.shape[-1]))

    def _attention_mask(self, attention_mask_BS, batch, length, past, keys, dtype, device):
        """Additive (B, 1, T, S) mask over the ``keys`` columns the attention reads: causal, padding keys hidden, each
        query always sees itself. A 4-D mask is taken as given (a static-cache decode step builds its own).

        The diagonal keeps padding rows from being all -inf (which would put NaN into the values that
        real rows multiply by zero); real tokens never look at padding, so their outputs are unaffected.
        ``past`` is an int, or a tensor for a static cache (whose ``keys`` columns past the written ones are hidden by
        causality: they lie after every query).
        """
        if attention_mask_BS is not None and attention_mask_BS.dim() == 4:
            return attention_mask_BS
        if attention_mask_BS is None:
            if length == 1 and not isinstance(past, torch.Tensor):
                return None
            attention_mask_BS = torch.ones(batch, keys, dtype=torch.bool, device=device)
        elif attention_mask_BS.shape[1] < keys:  # a static cache: columns not written yet
            pad = attention_mask_BS.new_ones(batch, keys - attention_mask_BS.shape[1])
            attention_mask_BS = torch.cat([attention_mask_BS, pad], dim=1)
        query_pos_T = torch.arange(length, device=device) + past
        key_pos_S = torch.arange(keys, device=device)
        allowed = (key_pos_S[None, :] <= query_pos_T[:, None])[None] & attention_mask_BS.bool()[:, None, :]
        allowed = allowed | (key_pos_S[None, :] == query_pos_T[:, None])[None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def forward(self, input_ids=None, attention_mask=None, images=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache: bool | None = None, position_ids=None,
                position_offsets: torch.Tensor | None = None, **kwargs):
        # position_ids are accepted for API compatibility and ignored: rotary positions are column indices.
        # position_offsets (B,), not in the official model: added to each row's column indices, for a batch whose
        # rows resume from a cache that was moved to other columns (sc_tune.prompt_cache); None: column indices.
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Qwen-VL forward: pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        # A static cache (sc_tune.decoding) reports its length as a tensor and keeps max_cache_len columns: a decode
        # step must not read the length on the host (it is captured as a CUDA graph), so positions add it on device.
        static = isinstance(cache, StaticCache)
        past = cache.get_seq_length() if cache is not None else 0

        embeds = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if input_ids is not None:
            embeds = self._splice_images(input_ids, embeds, images)
        hidden = self.drop(embeds)
        batch, length, _ = hidden.shape

        stored_alpha = getattr(cache, "qwen_ntk_alpha", None)
        if self.training or not self.config.use_dynamic_ntk:
            ntk_alpha = 1.0
        elif static and stored_alpha is not None:  # set by this cache's first pass
            ntk_alpha = stored_alpha
        elif static or past == 0:
            ntk_alpha = ntk_alpha_for(int(past) + length, self.config.seq_length)
        else:
            ntk_alpha = stored_alpha if stored_alpha is not None else 1.0
        if cache is not None and (past == 0 if not static else stored_alpha is None):
            cache.qwen_ntk_alpha = ntk_alpha
        positions = torch.arange(length, device=hidden.device) + past
        if position_offsets is not None:
            positions = positions[None, :] + position_offsets.to(hidden.device)[:, None]
        cos, sin = rotary_cos_sin(positions, self.config.kv_channels, self.config.rotary_emb_base, ntk_alpha)
        logn_B1T1 = None
        if self.config.use_logn_attn and not self.training:
            one_based = (positions + 1).double()
            logn = torch.where(one_based > self.config.seq_length,
                               one_based.log() / math.log(self.config.seq_length),
                               torch.ones_like(one_based)).float()
            logn_B1T1 = logn.view(-1, 1, length, 1)
        keys = cache.get_max_length() if static else past + length
        mask = self._attention_mask(attention_mask, batch, length, past, keys, hidden.dtype, hidden.device)

        for block in self.h:
            hidden = block(hidden, cos, sin, mask, cache, logn_B1T1)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden), cache=cache)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        # The images are spliced in at the prefill; later steps carry no <img> span (and a captured decode step must
        # not look for one: that search reads the tokens on the host).
        if not is_first_iteration and kwargs.get("use_cache", True):
            kwargs.pop("images", None)
        return super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        # transformers turns the 2-D mask into a 4-D one for a static cache; this model builds its own from the 2-D
        # mask (keeping padding rows off an all -inf row), and takes a 4-D mask only from a decode step.
        return attention_mask

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, images=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                position_ids=None, position_offsets: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        outputs = self.transformer(input_ids=input_ids, attention_mask=attention_mask, images=images, cache=cache,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, position_offsets=position_offsets)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("Qwen-VL forward: labels need the logits of every position (logits_to_keep=0)")
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
