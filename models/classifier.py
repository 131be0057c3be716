"""The noisy classifier: the UNet's encoder and middle block with a timestep embedding and a pooling head."""

from collections.abc import Sequence

import torch
from torch import nn

from .attention import AttentionBlock, AttentionPool2d
from .blocks import Downsample, EmbedSequential, ResBlock
from .layers import GroupNorm32, timestep_embedding, zero_module
from .unet import make_time_embed

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
        emb_dim = 4 * model_channels

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, dropout, out_channels=ch_out, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch):
            return AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order)

        self.time_embed = make_time_embed(model_channels)
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        feature_size = ch
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                feature_size += ch
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(EmbedSequential(down))
                feature_size += ch
                ds *= 2
        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        feature_size += ch

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
        self.dtype = torch.float32
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        for part in (self.input_blocks, self.middle_block):
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.half()
        self.dtype = torch.float16

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected input of shape (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {tuple(timesteps.shape)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.to(x.dtype))
