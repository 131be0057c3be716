"""Spatial self-attention (both of ADM's qkv channel layouts) and CLIP-style attention pooling.

Both run on `scaled_dot_product_attention`, which computes softmax(q k^T / sqrt(d)) v: the same
quantity as ADM's (q d^-1/4)(k d^-1/4) product, through fused kernels.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import GroupNorm32, conv1x1_as_linear, zero_module


def heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads: channels / head width when the width is fixed (!= -1), else num_heads."""
    if num_head_channels == -1:
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads}: attention with {channels} channels cannot be split into "
                             f"{num_heads} heads")
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"attention with {channels} channels is not divisible by num_head_channels={num_head_channels}")
    return channels // num_head_channels


def split_qkv(qkv: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split token-major qkv (B, T, 3C) into q, k, v of shape (B, heads, T, d).

    new_order=False (legacy): channels grouped per head as [q_h, k_h, v_h];
    new_order=True: first q | k | v (C each), then heads within each.
    """
    b, t, c3 = qkv.shape
    d = c3 // (3 * heads)
    if new_order:
        q, k, v = qkv.view(b, t, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = qkv.view(b, t, heads, 3, d).permute(3, 0, 2, 1, 4).unbind(0)
    return q, k, v


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all spatial positions: x + proj(attn(qkv(GN(x))))."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        self.num_heads = heads_for(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.new_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        # Token-major (B, T, C): free for channels-last input; qkv as one GEMM.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, *conv1x1_as_linear(self.qkv))
        q, k, v = split_qkv(qkv, self.num_heads, self.new_order)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
        a = a.transpose(1, 2).reshape(b, -1, c)  # channel index = head * d + j, as in ADM
        out = F.linear(a, *conv1x1_as_linear(self.proj_out))
        return x + out.transpose(1, 2).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """Pool a (B, C, S, S) map to (B, out) by attention from the spatial mean token.

    The mean is prepended as token 0, a learned positional embedding is added, and only token 0's
    attention output is projected (new qkv order, fixed head width), as in ADM's classifiers.
    """

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int | None = None):
        super().__init__()
        self.spatial_dim = spatial_dim
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = heads_for(embed_dim, 1, num_head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if x.shape[2:] != (self.spatial_dim, self.spatial_dim):
            raise ValueError(f"attention pooling expects a {self.spatial_dim}x{self.spatial_dim} map, "
                             f"got {tuple(x.shape[2:])}: the input image size does not match the classifier's")
        x = x.flatten(2)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        w, bias = conv1x1_as_linear(self.qkv_proj)
        tokens = x.transpose(1, 2)  # (B, T+1, C)
        d = c // self.num_heads
        # Only token 0 is read out, so only its query is needed.
        q = F.linear(tokens[:, :1], w[:c], bias[:c]).view(b, 1, self.num_heads, d).transpose(1, 2)
        kv = F.linear(tokens, w[c:], bias[c:]).view(b, -1, 2, self.num_heads, d).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, heads, 1, d)
        return F.linear(a.reshape(b, c), *conv1x1_as_linear(self.c_proj))
