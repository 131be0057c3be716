"""Residual blocks with timestep conditioning (AdaGN), BigGAN-style resampling, and plain resamplers."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import GroupNorm32, zero_module


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep(+class) embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class EmbedSequential(nn.Sequential, TimestepBlock):
    """nn.Sequential that hands the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def downsample_avg(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (optionally) a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        elif out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the channel count")
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_nearest(x)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling when use_conv is off."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels == channels:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)
        else:
            raise ValueError("Downsample without a conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """GN-SiLU-conv, embedding injection, GN-SiLU-dropout-conv(zero init), plus a skip path.

    With use_scale_shift_norm the embedding conditions the second norm as AdaGN:
    GN(h) * (1 + scale) + shift. With up/down the block resamples both paths (nearest x2 or
    2x2 average pooling, no learned resampler) between the first norm and conv (BigGAN style).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, use_checkpoint: bool = False,
                 up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.resample = upsample_nearest if up else downsample_avg if down else None
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm1, act, conv1 = self.in_layers
        h = act(norm1(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = conv1(h)
        e = self.emb_layers(emb)[:, :, None, None]
        norm2, act2, drop, conv2 = self.out_layers
        if self.use_scale_shift_norm:
            # GN(h)*(1+s)+b folded into one pass: n*(w*(1+s)) + (beta*(1+s)+b), n the affine-free norm.
            dt = norm2.io_dtype(h.dtype)  # float32 (ADM's) unless the norms run in the input's dtype
            scale, shift = e.to(dt).chunk(2, dim=1)
            gain = 1.0 + scale
            w = norm2.weight[None, :, None, None].to(dt) * gain
            b = torch.addcmul(shift, norm2.bias[None, :, None, None].to(dt), gain)
            h = torch.addcmul(b, norm2.normalize(h), w).to(h.dtype)
        else:
            h = norm2(h + e.to(h.dtype))
        h = act2(h)
        if drop.p > 0:
            h = drop(h)
        return self.skip_connection(x) + conv2(h)
