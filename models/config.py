"""Typed model configuration and the one function that turns it into a network."""

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .classifier import POOLS, EncoderUNetModel
from .unet import SuperResModel, UNetModel

ARCHS = ("unet", "upsampler", "classifier")

# ADM's channel multipliers per resolution (guided-diffusion's table), plus 32x32 as in improved
# diffusion's CIFAR model. The upsampler uses the 256 table at 512 so that it has no 8x8 level.
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
UPSAMPLER_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


@dataclass
class ModelConfig:
    arch: str = "unet"  # unet | upsampler | classifier
    image_size: int = 64  # input resolution (the upsampler's large size)
    small_size: int = 0  # upsampler only: resolution of the low-resolution conditioning image
    in_channels: int = 3  # image channels
    model_channels: int = 128  # base width C; the embedding MLP is 4C wide
    num_res_blocks: int = 2  # ResBlocks per encoder level (decoder: one more)
    attention_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])  # feature-map sizes with attention
    channel_mult: list[float] = field(default_factory=list)  # per-level width multipliers; [] = ADM default for image_size
    num_classes: int | None = None  # unet/upsampler: class-conditional on this many classes; classifier: logits
    learn_sigma: bool = False  # output 2x channels (mean and variance interpolation)
    dropout: float = 0.0  # dropout inside every ResBlock
    num_heads: int = 4  # attention heads when num_head_channels == -1
    num_head_channels: int = -1  # fixed head width (overrides num_heads) unless -1
    num_heads_upsample: int = -1  # decoder heads when the width is not fixed; -1 = num_heads
    use_scale_shift_norm: bool = True  # AdaGN conditioning
    resblock_updown: bool = False  # BigGAN-style resampling ResBlocks
    use_new_attention_order: bool = False  # qkv channel layout: q|k|v then heads (True) or per head (False)
    use_checkpoint: bool = False  # gradient checkpointing of ResBlocks and attention
    use_fp16: bool = False  # guided-diffusion's fp16 trunk (prefer bf16 autocast for training)
    pool: str = "attention"  # classifier head: attention | adaptive | spatial | spatial_v2

    def __post_init__(self):
        self.validate()

    @property
    def out_channels(self) -> int:
        if self.arch == "classifier":
            return self.num_classes or 0
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def class_cond(self) -> bool:
        return self.arch != "classifier" and self.num_classes is not None

    def resolved_channel_mult(self) -> tuple[float, ...]:
        if self.channel_mult:
            return tuple(self.channel_mult)
        table = UPSAMPLER_CHANNEL_MULT if self.arch == "upsampler" else DEFAULT_CHANNEL_MULT
        if self.image_size not in table:
            raise ValueError(f"model.channel_mult: no ADM default for image_size={self.image_size} "
                             f"(defaults exist for {sorted(table)}); set channel_mult explicitly")
        return table[self.image_size]

    def validate(self) -> None:
        def bad(key, msg):
            raise ValueError(f"model.{key}: {msg}")

        self._check_types()
        if self.arch not in ARCHS:
            bad("arch", f"{self.arch!r} is not one of {', '.join(ARCHS)}")
        for key in ("in_channels", "model_channels", "num_res_blocks"):
            if getattr(self, key) < 1:
                bad(key, f"must be at least 1, got {getattr(self, key)}")
        if self.pool not in POOLS:
            bad("pool", f"{self.pool!r} is not one of {', '.join(POOLS)}")
        if self.image_size <= 0:
            bad("image_size", f"must be positive, got {self.image_size}")
        mult = self.resolved_channel_mult()
        if any(m <= 0 for m in mult):
            bad("channel_mult", f"multipliers must be positive, got {list(mult)}")
        factor = 2 ** (len(mult) - 1)
        if self.image_size % factor:
            bad("image_size", f"{self.image_size} is not divisible by 2^(levels-1) = {factor} for channel_mult {list(mult)}")
        for m in mult:
            if int(m * self.model_channels) % 32:
                bad("model_channels", f"level width {m} x {self.model_channels} = {m * self.model_channels} is not a "
                                      "multiple of 32 (GroupNorm uses 32 groups)")
        for r in self.attention_resolutions:
            if r <= 0 or self.image_size % r:
                bad("attention_resolutions", f"{r} does not divide image_size {self.image_size}")
        if self.arch == "upsampler":
            if self.small_size <= 0 or self.small_size >= self.image_size:
                bad("small_size", f"the upsampler needs 0 < small_size < image_size, got {self.small_size}")
        if self.arch == "classifier" and not self.num_classes:
            bad("num_classes", "a classifier needs the number of classes it predicts")
        if self.num_classes is not None and self.num_classes <= 0:
            bad("num_classes", f"must be positive or null, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must lie in [0, 1), got {self.dropout}")
        if self.num_head_channels == -1 and self.num_heads <= 0:
            bad("num_heads", f"must be positive, got {self.num_heads}")
        if self.num_head_channels not in (-1,) and self.num_head_channels <= 0:
            bad("num_head_channels", f"must be positive or -1, got {self.num_head_channels}")
        if self.arch == "classifier" and self.pool == "attention" and self.num_head_channels == -1:
            bad("num_head_channels", "attention pooling needs a fixed head width")
        if self.num_heads_upsample != -1 and self.num_heads_upsample <= 0:
            bad("num_heads_upsample", f"must be positive or -1, got {self.num_heads_upsample}")
        self._check_heads(mult)

    def _check_heads(self, mult) -> None:
        """Every attention layer's width splits into its heads (the network's own check comes only when it is
        built: after a job was submitted, on every rank)."""
        from .attention import heads_for

        widths = [int(m * self.model_channels) for m in mult]
        attn = [w for i, w in enumerate(widths) if self.image_size // 2 ** i in self.attention_resolutions]
        up_heads = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        layers = [(w, self.num_heads, "num_heads") for w in attn + [widths[-1]]]  # the encoder's and the middle's
        if self.arch != "classifier":
            layers += [(w, up_heads, "num_heads_upsample" if self.num_heads_upsample != -1 else "num_heads")
                       for w in attn]
        elif self.pool == "attention":
            layers.append((widths[-1], 1, "num_heads"))
        for width, heads, key in layers:
            try:
                heads_for(width, heads, self.num_head_channels)
            except ValueError as e:
                raise ValueError(f"model.{'num_head_channels' if self.num_head_channels != -1 else key}: {e}") from None

    def _check_types(self) -> None:
        """Each field holds its annotated type (a config.json edited by hand, a YAML read without OmegaConf's
        checks), so that a "32" for model_channels is named here, not met as a TypeError deep in the UNet."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            allowed = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}
            if kind == int | None:
                ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
            elif kind in allowed:
                ok = isinstance(value, allowed[kind]) and (kind is bool or not isinstance(value, bool))
            else:  # list[int] | list[float]
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            if not ok:
                raise ValueError(f"model.{f.name}: expected {getattr(kind, '__name__', kind)}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the network a config describes (on the current default device)."""
    common = dict(
        image_size=cfg.image_size, model_channels=cfg.model_channels, out_channels=cfg.out_channels,
        num_res_blocks=cfg.num_res_blocks, attention_resolutions=tuple(cfg.attention_resolutions),
        channel_mult=cfg.resolved_channel_mult(), dropout=cfg.dropout, use_checkpoint=cfg.use_checkpoint,
        use_fp16=cfg.use_fp16, num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels,
        use_scale_shift_norm=cfg.use_scale_shift_norm, resblock_updown=cfg.resblock_updown,
        use_new_attention_order=cfg.use_new_attention_order)
    if cfg.arch == "classifier":
        return EncoderUNetModel(in_channels=cfg.in_channels, pool=cfg.pool, **common)
    common.update(num_classes=cfg.num_classes, num_heads_upsample=cfg.num_heads_upsample)
    if cfg.arch == "upsampler":
        return SuperResModel(in_channels=cfg.in_channels, small_size=cfg.small_size, **common)
    return UNetModel(in_channels=cfg.in_channels, **common)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count without allocating memory (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for p in model.parameters())


def expected_layout(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of the network a config describes, without allocating memory."""
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
