"""Qwen-VL's vision tower: a ViT-bigG/14 whose patch features a one-layer cross-attention resampler pools
into ``n_queries`` (256) vectors of the language model's width.

Module and parameter names follow the official checkpoint (``transformer.visual.*``), so its state dict
loads as is. Details that matter for equivalence with the official weights:

- the ViT's ``in_proj`` lays q, k and v out per head (``[head][q|k|v]``), not as three blocks;
- the learned 16x16 patch position table (256 rows) is bicubically resized to the actual patch grid, and
  the resampler's fixed 2-D sin-cos table is resized to the patch grid for the keys;
- the resampler is ``torch.nn.MultiheadAttention`` with ``output_dim // 128`` heads, queries and keys both
  carrying 2-D positions, values without.

Nothing here creates tensors outside parameters and the resampler's sin-cos table (a persistent buffer): models are
built on the meta device and then loaded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LEARNED_POSITIONS = 256  # rows of the ViT's learned position table in every official checkpoint


def resize_positions(table_LC: torch.Tensor, target_len: int) -> torch.Tensor:
    """A square position table (side sqrt(L)) resized bicubically to side sqrt(target_len)."""
    src_side, dst_side = int(math.sqrt(table_LC.shape[0])), int(math.sqrt(target_len))
    if src_side == dst_side:
        return table_LC
    grid_1CHW = table_LC.float().reshape(1, src_side, src_side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid_1CHW, size=(dst_side, dst_side), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2).to(table_LC.dtype)


def sincos_positions_2d(dim: int, side: int) -> np.ndarray:
    """(side*side, dim) fixed positions: half the channels encode the row, half the column."""

    def one_axis(half_dim: int, coords: np.ndarray) -> np.ndarray:
        freqs = 1.0 / 10000 ** (np.arange(half_dim // 2, dtype=np.float32) / (half_dim / 2.0))
        angles = np.einsum("m,d->md", coords.reshape(-1), freqs)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    cols, rows = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    # Official order: the first half is driven by the x (column) coordinate grid.
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class VisualAttention(nn.Module):
    """Multi-head self-attention whose fused projection is laid out head by head."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"Qwen-VL visual: width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x_NLC: torch.Tensor) -> torch.Tensor:
        n, length, width = x_NLC.shape
        qkv = self.in_proj(x_NLC).view(n, length, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # N,H,L,D each
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


def _import_checkpointing_layer():
    from transformers.modeling_layers import GradientCheckpointingLayer

    return GradientCheckpointingLayer


class VisualAttentionBlock(_import_checkpointing_layer()):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = VisualMLP(width, int(width * mlp_ratio))

    def forward(self, x_NLC):
        x_NLC = x_NLC + self.attn(self.ln_1(x_NLC))
        return x_NLC + self.mlp(self.ln_2(x_NLC))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x_NLC):
        for block in self.resblocks:
            x_NLC = block(x_NLC)
        return x_NLC


class Resampler(nn.Module):
    """``n_queries`` learned queries cross-attend once to the patch features (the ``attn_pool``)."""

    def __init__(self, n_queries: int, embed_dim: int, kv_dim: int):
        super().__init__()
        self.side = int(math.isqrt(n_queries))
        if self.side * self.side != n_queries:
            raise ValueError(f"Qwen-VL visual: n_queries {n_queries} must be a square number")
        self.embed_dim = embed_dim
        # Fixed sin-cos positions, stored in the official checkpoint (a frozen parameter there). A persistent buffer
        # here: saved and loaded under the same name, and never trained. A parameter made with requires_grad=False
        # comes back trainable from transformers 5's from_pretrained, and full fine-tuning then moved the table.
        self.register_buffer("pos_embed", torch.empty(n_queries, embed_dim), persistent=True)
        self.query = nn.Parameter(torch.empty(n_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, embed_dim // 128)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def fixed_positions(self) -> torch.Tensor:
        return torch.from_numpy(sincos_positions_2d(self.embed_dim, self.side)).float()

    def forward(self, x_NLC: torch.Tensor) -> torch.Tensor:
        key_pos_LC = resize_positions(self.pos_embed, x_NLC.shape[1])
        kv_LNC = self.ln_kv(self.kv_proj(x_NLC)).permute(1, 0, 2)
        query_QC = self.ln_q(self.query)
        query_QNC = query_QC.unsqueeze(1).expand(-1, kv_LNC.shape[1], -1) + self.pos_embed.unsqueeze(1)
        out_QNC = self.attn(query_QNC, kv_LNC + key_pos_LC.unsqueeze(1), kv_LNC, need_weights=False)[0]
        return out_QNC.permute(1, 0, 2)


class VisionTransformer(nn.Module):
    """Pixels ``(N, 3, S, S)`` (see :mod:`.image_processing`) -> image features ``(N, n_queries, output_dim)``."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float, output_dim: int, n_queries: int = 256, **_ignored):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(LEARNED_POSITIONS, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio)
        self.attn_pool = Resampler(n_queries, output_dim, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(output_dim, output_dim))

    def forward(self, pixels_N3HW: torch.Tensor) -> torch.Tensor:
        if pixels_N3HW.ndim != 4 or pixels_N3HW.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"Qwen-VL images must be (N, 3, {self.image_size}, {self.image_size}) pixel tensors, "
                f"got {tuple(pixels_N3HW.shape)}"
            )
        x = self.conv1(pixels_N3HW.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device))
        x_NLC = x.flatten(2).transpose(1, 2)
        x_NLC = x_NLC + resize_positions(self.positional_embedding, x_NLC.shape[1])
        x_NLC = self.transformer(self.ln_pre(x_NLC))
        return self.ln_post(self.attn_pool(x_NLC)) @ self.proj
