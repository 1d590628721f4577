"""The Perceiver resampler of OmniLMM / MiniCPM-V: cross-attention from `num_queries` learned queries to the
vision features, with 2-D sin-cos positions (MAE's table) that follow the image's patch grid."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table for a `grid_size x grid_size` grid: `(grid_size**2, embed_dim)`, float32. The first
    half of the channels encodes `grid[0]` (from `meshgrid(grid_w, grid_h)`, w first), the second half `grid[1]`;
    each half is `[sin | cos]` with `omega = 1 / 10000 ** (arange(D/4) / (D/4))`."""
    if embed_dim % 4:
        raise ValueError(f"the sin-cos table needs `embed_dim` divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # w goes first, as in MAE
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def sincos(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([sincos(grid_w), sincos(grid_h)], dim=1).float()


class ResamplerAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` (same parameters, same state-dict names) whose output projection is a module call:
    torch's own forward reads `out_proj.weight` without calling `out_proj`; under accelerate's CPU/disk offload a
    module's weights are loaded only when that module is called, so there it would be a meta tensor."""

    def forward(self, query, key, value, need_weights=False, **kwargs):
        length, batch, dim = query.shape
        heads = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def split(x, weight, bias):  # (L, B, D) -> (B, heads, L, head_dim)
            return F.linear(x, weight, bias).reshape(x.shape[0], batch, heads, dim // heads).permute(1, 2, 0, 3)

        q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, dim)), None


class Resampler(nn.Module):
    """`(B, L, kv_dim)` vision features on an `(h, w)` patch grid → `(B, num_queries, embed_dim)` tokens."""

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int | None = None):
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.grid_size = int(math.isqrt(num_queries))
        # Stored by the release (bf16) and loaded from the checkpoint; `_init_weights` fills it for new models.
        self.pos_embed = nn.Parameter(torch.empty(num_queries, embed_dim), requires_grad=False)
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        kv_dim = kv_dim or embed_dim
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))

    def key_pos_embed(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The position table resized to the key grid `(h, w)`: `(h * w, embed_dim)`, bicubic in fp32."""
        if tuple(grid_hw) == (self.grid_size, self.grid_size):
            return self.pos_embed
        table = self.pos_embed.float().reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=tuple(grid_hw), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).flatten(0, 2).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """x: `(B, h * w, kv_dim)` patch features of images whose patch grid is `grid_hw = (h, w)`."""
        if x.shape[1] != grid_hw[0] * grid_hw[1]:
            raise ValueError(f"{x.shape[1]} vision tokens do not fill a {grid_hw[0]}x{grid_hw[1]} patch grid")
        key_pos = self.key_pos_embed(grid_hw)
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # (L, B, D): nn.MultiheadAttention is sequence-first
        query = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)  # (Q, B, D)
        out = self.attn(query + self.pos_embed.unsqueeze(1), x + key_pos.unsqueeze(1), x, need_weights=False)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj
