"""The ADM UNet and its super-resolution variant (the upsampler)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import EmbedSequential
from .layers import GroupNorm32, timestep_embedding, zero_module
from .trunk import BlockFactory, build_encoder, check_image_input, convert_convs_to_fp16, make_time_embed


def check_labels(y: torch.Tensor | None, num_classes: int | None, batch: int) -> None:
    """Raise a clear error when labels do not fit the model's conditioning.

    The range check reads the values, so it runs only for CPU tensors (on an accelerator it would
    force a device sync on every step); entry points that take labels from users call it on CPU.
    """
    if num_classes is None:
        if y is not None:
            raise ValueError("this model is unconditional (num_classes=None) but class labels y were passed")
        return
    if y is None:
        raise ValueError(f"this model is class-conditional (num_classes={num_classes}): pass labels y of shape (N,)")
    if y.shape != (batch,):
        raise ValueError(f"labels y must have shape ({batch},), got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels y must be integer class indices, got dtype {y.dtype}")
    if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got min {int(y.min())}, max {int(y.max())}")


class UNetModel(nn.Module):
    """ADM's UNet: encoder levels of ResBlocks (+attention), a middle block, a mirrored decoder with
    skip concatenation, and a zero-initialised output head. Parameter names follow guided-diffusion,
    so its released checkpoints load with strict=True.

    attention_resolutions are feature-map resolutions (e.g. 32, 16, 8), as in guided-diffusion's flags.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], channel_mult: Sequence[float],
                 dropout: float = 0.0, conv_resample: bool = True, num_classes: int | None = None,
                 use_checkpoint: bool = False, use_fp16: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.patch_size = 0  # > 0: also takes patch_size x patch_size inputs (set by a trainer that trains on patches)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.channel_mult = tuple(channel_mult)
        attn_ds = {image_size // r for r in attention_resolutions}
        emb_dim = 4 * model_channels
        make = BlockFactory(emb_dim, dropout, use_checkpoint, use_scale_shift_norm, num_head_channels,
                            use_new_attention_order, resblock_updown, conv_resample)

        self.time_embed = make_time_embed(model_channels)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)
        self.input_blocks, skip_channels, ch, ds = build_encoder(
            make, in_channels, model_channels, channel_mult, num_res_blocks, attn_ds, num_heads)
        stem_ch = skip_channels[0]
        self.middle_block = EmbedSequential(make.res(ch, ch), make.attn(ch, num_heads), make.res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [make.res(ch + skip_channels.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attn_ds:
                    layers.append(make.attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(make.up(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(stem_ch, out_channels, 3, padding=1)))
        if use_fp16:
            self.convert_to_fp16()

    @property
    def dtype(self) -> torch.dtype:
        """The trunk's dtype (float16 after convert_to_fp16, bfloat16 under DeepSpeed bf16)."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> None:
        convert_convs_to_fp16(self.input_blocks, self.middle_block, self.output_blocks)

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        features = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(features)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        return emb

    def check_input(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None) -> None:
        check_image_input(x, timesteps, self.in_channels, self.image_size, self.patch_size)
        check_labels(y, self.num_classes, x.shape[0])

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, timesteps, y)
        emb = self.embed(timesteps, y)
        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(self.out[2].weight.dtype))


class SuperResModel(UNetModel):
    """The upsampler: a UNet at the large size whose input is [x_t, bilinear_upsample(low_res)]."""

    def __init__(self, image_size: int, in_channels: int, *args, small_size: int | None = None, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)
        self.small_size = small_size
        self.image_channels = in_channels

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, low_res: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if low_res is None:
            raise ValueError("the upsampler needs its low-resolution conditioning image: forward(x, t, low_res=..., y=...)")
        # x first: its size sets low_res's
        check_image_input(x, timesteps, self.image_channels, self.image_size, self.patch_size)
        if low_res.ndim != 4 or low_res.shape[:2] != x.shape[:2]:
            raise ValueError(f"low_res must have shape (N, {self.image_channels}, s, s) matching x {tuple(x.shape)}, "
                             f"got {tuple(low_res.shape)}")
        small = self.small_size and x.shape[2] * self.small_size // self.image_size  # (a patch's while it trains)
        if small and low_res.shape[2:] != (small, small):
            raise ValueError(f"this upsampler was built for {self.small_size}x{self.small_size} low-resolution inputs, "
                             f"got {tuple(low_res.shape[2:])}" + (f" for a {x.shape[2]}x{x.shape[2]} patch, want "
                             f"{small}x{small}" if x.shape[2] != self.image_size else ""))
        up = F.interpolate(low_res, size=x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, up.to(x.dtype)], dim=1), timesteps, y)
