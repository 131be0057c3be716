"""The noisy classifier: the UNet's encoder and middle block with a timestep embedding and a pooling head."""

from collections.abc import Sequence

import torch
from torch import nn

from .attention import AttentionPool2d
from .blocks import EmbedSequential
from .layers import GroupNorm32, timestep_embedding, zero_module
from .trunk import BlockFactory, build_encoder, check_image_input, convert_convs_to_fp16, make_time_embed

POOLS = ("attention", "adaptive", "spatial", "spatial_v2")


class EncoderUNetModel(nn.Module):
    """Encoder half of the ADM UNet, classifying noisy images x_t at timestep t.

    pool: "attention" (CLIP-style attention pooling, all released classifiers), "adaptive"
    (global average + zero-init 1x1 conv), "spatial" / "spatial_v2" (MLP on the spatial means of
    every encoder stage and the middle block).
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], channel_mult: Sequence[float],
                 dropout: float = 0.0, conv_resample: bool = True, use_checkpoint: bool = False,
                 use_fp16: bool = False, num_heads: int = 1, num_head_channels: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, pool: str = "adaptive"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown classifier pool {pool!r}; expected one of {', '.join(POOLS)}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.pool = pool
        attn_ds = {image_size // r for r in attention_resolutions}
        make = BlockFactory(4 * model_channels, dropout, use_checkpoint, use_scale_shift_norm, num_head_channels,
                            use_new_attention_order, resblock_updown, conv_resample)
        self.time_embed = make_time_embed(model_channels)
        self.input_blocks, channels, ch, ds = build_encoder(
            make, in_channels, model_channels, channel_mult, num_res_blocks, attn_ds, num_heads)
        self.middle_block = EmbedSequential(make.res(ch, ch), make.attn(ch, num_heads), make.res(ch, ch))
        feature_size = sum(channels) + ch  # the spatial heads read every block's mean and the middle's

        if pool == "attention":
            if num_head_channels == -1:
                raise ValueError("attention pooling needs a fixed head width (num_head_channels != -1)")
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                     AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))
        elif pool == "adaptive":
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     zero_module(nn.Conv2d(ch, out_channels, 1)), nn.Flatten())
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:  # spatial_v2
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), GroupNorm32(2048), nn.SiLU(),
                                     nn.Linear(2048, out_channels))
        if use_fp16:
            self.convert_to_fp16()

    @property
    def dtype(self) -> torch.dtype:
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> None:
        convert_convs_to_fp16(self.input_blocks, self.middle_block)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        check_image_input(x, timesteps, self.in_channels, self.image_size)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        spatial = self.pool.startswith("spatial")
        head_dtype = next(self.out.parameters()).dtype
        means = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.to(head_dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(head_dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.to(head_dtype))
