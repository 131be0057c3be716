"""Small pieces shared by every ADM network: float32 GroupNorm, timestep embedding, zero init."""

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # ADM normalises with GroupNorm(32) everywhere


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype normalisation runs in: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) whose statistics are computed in at least float32, then cast back (ADM's). With
    `fp32_io = False` (set_norm_io) a bf16/fp16 input is normalised as it is: the fused kernels accumulate
    the statistics in float32 anyway, and no float32 copy of the activation is made and kept for backward."""

    fp32_io = True

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def io_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype this norm reads and writes for an input of `dtype`."""
        return norm_dtype(dtype) if self.fp32_io else dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.io_dtype(x.dtype)
        if dt == x.dtype == self.weight.dtype:
            return F.group_norm(x, GROUPS, self.weight, self.bias, self.eps)
        return F.group_norm(x.to(dt), GROUPS, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The affine-free part, in io_dtype (callers fold weight and bias into their own affine)."""
        return F.group_norm(x.to(self.io_dtype(x.dtype)), GROUPS, None, None, self.eps)


def set_norm_io(model: nn.Module, fp32: bool) -> nn.Module:
    """Every GroupNorm32 of model: float32 in and out (ADM's, the default) or the input's own dtype (faster
    in bf16 on a GPU; outputs differ by the rounding of bf16). No weight changes."""
    for m in model.modules():
        if isinstance(m, GroupNorm32):
            m.fp32_io = fp32
    return model


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place (ADM zero-initialises every residual branch's last op)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_k), sin(t f_k)] with f_k = exp(-ln(max_period) k / (dim//2)),
    cosines first, zero-padded when dim is odd. Always float32, whatever the model's dtype.

    `t` holds the original (integer-valued, float allowed) timestep indices, shape (N,).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def conv1x1_as_linear(conv: nn.Conv1d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """View a kernel-size-1 Conv1d's weight as a Linear weight (no copy): (out, in, 1) -> (out, in)."""
    return conv.weight.squeeze(-1), conv.bias
