"""Every published ADM model, and tiny CPU models for tests and the demo, as one table.

Each preset gives the model fields (see ModelConfig) and the diffusion the model was trained with.
`paper_params_m` is the parameter count the paper states (millions); tests hold us to it.
"""

from dataclasses import dataclass, field

from .config import ModelConfig

_ADM = dict(arch="unet", num_classes=1000, learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True,
            attention_resolutions=[32, 16, 8], num_res_blocks=2, model_channels=256, num_head_channels=64)
_UPSAMPLER = dict(_ADM, arch="upsampler", model_channels=192)
_CLASSIFIER = dict(arch="classifier", num_classes=1000, model_channels=128, num_res_blocks=2,
                   attention_resolutions=[32, 16, 8], num_head_channels=64, use_scale_shift_norm=True,
                   resblock_updown=True, pool="attention")
_TINY = dict(model_channels=32, num_res_blocks=1, channel_mult=[1, 2, 2], attention_resolutions=[8],
             num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True, num_classes=10)


@dataclass(frozen=True)
class Preset:
    name: str
    model: dict
    description: str
    paper_params_m: float | None = None  # as printed in the paper (Tables 11-13)
    diffusion: dict = field(default_factory=lambda: dict(steps=1000, noise_schedule="linear"))

    def config(self) -> ModelConfig:
        return ModelConfig(**self.model)


def _p(name, model, description, paper=None, schedule="linear"):
    return Preset(name, model, description, paper, dict(steps=1000, noise_schedule=schedule))


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _p("adm-64", dict(_ADM, image_size=64, model_channels=192, num_res_blocks=3, dropout=0.1,
                      use_new_attention_order=True), "ADM ImageNet 64x64, class-conditional", 296, "cosine"),
    _p("adm-128", dict(_ADM, image_size=128, num_head_channels=-1, num_heads=4),
       "ADM ImageNet 128x128, class-conditional", 422),
    _p("adm-256", dict(_ADM, image_size=256), "ADM ImageNet 256x256, class-conditional", 554),
    _p("adm-256-uncond", dict(_ADM, image_size=256, num_classes=None), "ADM ImageNet 256x256, unconditional", None),
    _p("adm-512", dict(_ADM, image_size=512), "ADM ImageNet 512x512, class-conditional", 559),
    _p("adm-lsun", dict(_ADM, image_size=256, num_classes=None, dropout=0.1),
       "ADM LSUN 256x256 (bedroom/cat/horse), unconditional", 552),
    _p("upsampler-64-256", dict(_UPSAMPLER, image_size=256, small_size=64, num_head_channels=-1, num_heads=4),
       "ADM-U upsampler 64->256, class-conditional", 312),
    _p("upsampler-128-512", dict(_UPSAMPLER, image_size=512, small_size=128, attention_resolutions=[32, 16]),
       "ADM-U upsampler 128->512, class-conditional", 309),
    _p("classifier-64", dict(_CLASSIFIER, image_size=64, num_res_blocks=4), "noisy classifier ImageNet 64", 65, "cosine"),
    _p("classifier-128", dict(_CLASSIFIER, image_size=128), "noisy classifier ImageNet 128", 43),
    _p("classifier-256", dict(_CLASSIFIER, image_size=256), "noisy classifier ImageNet 256", 54),
    _p("classifier-512", dict(_CLASSIFIER, image_size=512), "noisy classifier ImageNet 512", 54),
    _p("tiny-32", dict(_TINY, arch="unet", image_size=32, learn_sigma=True),
       "tiny class-conditional UNet, 32x32, 10 classes (CPU tests and demo)", schedule="cosine"),
    _p("tiny-classifier-32", dict(_TINY, arch="classifier", image_size=32, pool="attention"),
       "tiny noisy classifier, 32x32, 10 classes", schedule="cosine"),
    _p("tiny-upsampler-32-64", dict(_TINY, arch="upsampler", image_size=64, small_size=32, learn_sigma=True,
                                    channel_mult=[1, 1, 2, 2], attention_resolutions=[8]),
       "tiny upsampler 32->64, 10 classes", schedule="linear"),
]}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
