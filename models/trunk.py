"""What the UNet and the noisy classifier share: the block factory, the encoder, input checks, fp16."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionBlock
from .blocks import Downsample, EmbedSequential, ResBlock, Upsample


@dataclass
class BlockFactory:
    """Builds ResBlocks, attention and resamplers with one network's shared settings."""
    emb_dim: int
    dropout: float
    use_checkpoint: bool
    use_scale_shift_norm: bool
    num_head_channels: int
    use_new_attention_order: bool
    resblock_updown: bool
    conv_resample: bool = True

    def res(self, ch_in: int, ch_out: int, **kw) -> ResBlock:
        return ResBlock(ch_in, self.emb_dim, self.dropout, out_channels=ch_out, use_checkpoint=self.use_checkpoint,
                        use_scale_shift_norm=self.use_scale_shift_norm, **kw)

    def attn(self, ch: int, heads: int) -> AttentionBlock:
        return AttentionBlock(ch, num_heads=heads, num_head_channels=self.num_head_channels,
                              use_checkpoint=self.use_checkpoint, use_new_attention_order=self.use_new_attention_order)

    def down(self, ch: int) -> nn.Module:
        return self.res(ch, ch, down=True) if self.resblock_updown else Downsample(ch, self.conv_resample)

    def up(self, ch: int) -> nn.Module:
        return self.res(ch, ch, up=True) if self.resblock_updown else Upsample(ch, self.conv_resample)


def build_encoder(make: BlockFactory, in_channels: int, model_channels: int, channel_mult: Sequence[float],
                  num_res_blocks: int, attn_ds: set[int], num_heads: int):
    """Stem conv + levels of ResBlocks (+attention), downsampling between levels.

    Returns (input_blocks, channels of each block's output, final channels, final downsample factor).
    """
    ch = int(channel_mult[0] * model_channels)
    blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    channels = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [make.res(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attn_ds:
                layers.append(make.attn(ch, num_heads))
            blocks.append(EmbedSequential(*layers))
            channels.append(ch)
        if level != len(channel_mult) - 1:
            blocks.append(EmbedSequential(make.down(ch)))
            channels.append(ch)
            ds *= 2
    return blocks, channels, ch, ds


def make_time_embed(model_channels: int) -> nn.Sequential:
    """Sinusoidal timestep features -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C) (keys time_embed.0/.2)."""
    d = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, d), nn.SiLU(), nn.Linear(d, d))


def check_image_input(x: torch.Tensor, timesteps: torch.Tensor, channels: int, size: int, patch: int = 0) -> None:
    """`patch` > 0: patch x patch inputs are taken too (an upsampler while it trains on patches)."""
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] != x.shape[3] or x.shape[2] not in (size, patch or size):
        also = f" (or {patch}x{patch} patches)" if patch else ""
        raise ValueError(f"expected input of shape (N, {channels}, {size}, {size}){also}, got {tuple(x.shape)}")
    if timesteps.shape != (x.shape[0],):
        raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {tuple(timesteps.shape)}")


def convert_convs_to_fp16(*parts: nn.Module) -> torch.dtype:
    """guided-diffusion's use_fp16: conv weights of the trunk in half; norms, embeddings, head stay fp32.
    (For training prefer bf16 autocast; this exists for parity with the released runs.)"""
    for part in parts:
        for m in part.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                m.half()
    return torch.float16
