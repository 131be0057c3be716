"""guided-diffusion's script-level API (flag names, defaults, constructors) on top of our models.

People who know `guided_diffusion.script_util` can use the same flags; the modules built here have
exactly the released checkpoints' state-dict keys and shapes, and the diffusion is our GaussianDiffusion
(a SpacedDiffusion, as in guided-diffusion) with the same method names and semantics.
"""

import inspect

from torch import nn

from . import gaussian_diffusion as gd
from .config import ModelConfig, build_model
from .respace import SpacedDiffusion, space_timesteps
from .schedules import get_named_beta_schedule

NUM_CLASSES = 1000


def diffusion_defaults() -> dict:
    return dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)


def classifier_defaults() -> dict:
    return dict(image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
                classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
                classifier_resblock_updown=True, classifier_pool="attention")


def model_and_diffusion_defaults() -> dict:
    return dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
                class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
                use_fp16=False, use_new_attention_order=False, **diffusion_defaults())


def classifier_and_diffusion_defaults() -> dict:
    return {**classifier_defaults(), **diffusion_defaults()}


def sr_model_and_diffusion_defaults() -> dict:
    keep = inspect.signature(sr_create_model_and_diffusion).parameters
    flags = {**model_and_diffusion_defaults(), "large_size": 256, "small_size": 64}
    return {k: v for k, v in flags.items() if k in keep}


def _ints(flag: str, value) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"flag {flag}: expected comma-separated integers, got {value!r}") from None


def _mult(value) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    try:
        return [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"flag channel_mult: expected comma-separated numbers, got {value!r}") from None


def _check_flags(given: dict, allowed: dict, what: str) -> dict:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} flag(s): {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    return {**allowed, **given}


def model_config(image_size, num_channels, num_res_blocks, channel_mult="", learn_sigma=False, class_cond=False,
                 use_checkpoint=False, attention_resolutions="16", num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0.0, resblock_updown=False,
                 use_fp16=False, use_new_attention_order=False) -> ModelConfig:
    return ModelConfig(arch="unet", image_size=image_size, model_channels=num_channels, num_res_blocks=num_res_blocks,
                       channel_mult=_mult(channel_mult), learn_sigma=learn_sigma,
                       num_classes=NUM_CLASSES if class_cond else None, use_checkpoint=use_checkpoint,
                       attention_resolutions=_ints("attention_resolutions", attention_resolutions), num_heads=num_heads,
                       num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
                       use_scale_shift_norm=use_scale_shift_norm, dropout=dropout, resblock_updown=resblock_updown,
                       use_fp16=use_fp16, use_new_attention_order=use_new_attention_order)


def classifier_config(image_size, classifier_use_fp16, classifier_width, classifier_depth,
                      classifier_attention_resolutions, classifier_use_scale_shift_norm,
                      classifier_resblock_updown, classifier_pool) -> ModelConfig:
    return ModelConfig(arch="classifier", image_size=image_size, model_channels=classifier_width,
                       num_res_blocks=classifier_depth, num_classes=NUM_CLASSES,
                       attention_resolutions=_ints("classifier_attention_resolutions", classifier_attention_resolutions),
                       num_head_channels=64, use_scale_shift_norm=classifier_use_scale_shift_norm,
                       resblock_updown=classifier_resblock_updown, pool=classifier_pool, use_fp16=classifier_use_fp16)


def sr_model_config(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
                    attention_resolutions, num_heads, num_head_channels, num_heads_upsample, use_scale_shift_norm,
                    dropout, resblock_updown, use_fp16) -> ModelConfig:
    return ModelConfig(arch="upsampler", image_size=large_size, small_size=small_size, model_channels=num_channels,
                       num_res_blocks=num_res_blocks, learn_sigma=learn_sigma,
                       num_classes=NUM_CLASSES if class_cond else None, use_checkpoint=use_checkpoint,
                       attention_resolutions=_ints("attention_resolutions", attention_resolutions), num_heads=num_heads,
                       num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
                       use_scale_shift_norm=use_scale_shift_norm, dropout=dropout, resblock_updown=resblock_updown,
                       use_fp16=use_fp16)


def _pick(fn, flags: dict) -> dict:
    names = inspect.signature(fn).parameters
    return {k: v for k, v in flags.items() if k in names}


def create_model(image_size, num_channels, num_res_blocks, **flags) -> nn.Module:
    return build_model(model_config(image_size, num_channels, num_res_blocks, **flags))


def create_classifier(**flags) -> nn.Module:
    flags = _check_flags(flags, classifier_defaults(), "classifier")
    return build_model(classifier_config(**flags))


def create_gaussian_diffusion(*, steps=1000, learn_sigma=False, sigma_small=False, noise_schedule="linear",
                              use_kl=False, predict_xstart=False, rescale_timesteps=False,
                              rescale_learned_sigmas=False, timestep_respacing=""):
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(use_timesteps=space_timesteps(steps, timestep_respacing or [steps]), betas=betas,
                           model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
                           model_var_type=var_type, loss_type=loss_type, rescale_timesteps=rescale_timesteps)


def _diffusion(flags: dict):
    return create_gaussian_diffusion(
        steps=flags["diffusion_steps"], learn_sigma=flags["learn_sigma"], noise_schedule=flags["noise_schedule"],
        use_kl=flags["use_kl"], predict_xstart=flags["predict_xstart"], rescale_timesteps=flags["rescale_timesteps"],
        rescale_learned_sigmas=flags["rescale_learned_sigmas"], timestep_respacing=flags["timestep_respacing"])


def create_model_and_diffusion(**flags):
    flags = _check_flags(flags, model_and_diffusion_defaults(), "model/diffusion")
    model = build_model(model_config(**_pick(model_config, flags)))
    return model, _diffusion(flags)


def create_classifier_and_diffusion(**flags):
    flags = _check_flags(flags, classifier_and_diffusion_defaults(), "classifier/diffusion")
    classifier = build_model(classifier_config(**{k: flags[k] for k in classifier_defaults()}))
    return classifier, _diffusion(flags)


def sr_create_model_and_diffusion(large_size, small_size, class_cond, learn_sigma, num_channels, num_res_blocks,
                                  num_heads, num_head_channels, num_heads_upsample, attention_resolutions, dropout,
                                  diffusion_steps, noise_schedule, timestep_respacing, use_kl, predict_xstart,
                                  rescale_timesteps, rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm,
                                  resblock_updown, use_fp16):
    model = sr_create_model(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond,
                            use_checkpoint, attention_resolutions, num_heads, num_head_channels, num_heads_upsample,
                            use_scale_shift_norm, dropout, resblock_updown, use_fp16)
    return model, create_gaussian_diffusion(
        steps=diffusion_steps, learn_sigma=learn_sigma, noise_schedule=noise_schedule, use_kl=use_kl,
        predict_xstart=predict_xstart, rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas, timestep_respacing=timestep_respacing)


def diffusion_from_preset(diffusion: dict, learn_sigma: bool, timestep_respacing: str = ""):
    """The diffusion a preset's or a snapshot's model was trained with (optionally respaced for sampling):
    {steps, noise_schedule, predict_xstart (what the network outputs; absent: ε, as every ADM model)}."""
    return create_gaussian_diffusion(steps=diffusion["steps"], noise_schedule=diffusion["noise_schedule"],
                                     predict_xstart=diffusion.get("predict_xstart", False),
                                     learn_sigma=learn_sigma, timestep_respacing=timestep_respacing)


def sr_create_model(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
                    attention_resolutions, num_heads, num_head_channels, num_heads_upsample, use_scale_shift_norm,
                    dropout, resblock_updown, use_fp16) -> nn.Module:
    return build_model(sr_model_config(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond,
                                       use_checkpoint, attention_resolutions, num_heads, num_head_channels,
                                       num_heads_upsample, use_scale_shift_norm, dropout, resblock_updown, use_fp16))


def config_from_flags(flags: dict) -> ModelConfig:
    """The ModelConfig for a guided-diffusion flag dict of any of the three kinds (as in the layouts file)."""
    if any(k.startswith("classifier_") for k in flags):
        return classifier_config(**_check_flags(flags, classifier_defaults(), "classifier"))
    if "large_size" in flags:
        return sr_model_config(**_pick(sr_model_config, _check_flags(flags, sr_model_and_diffusion_defaults(), "upsampler")))
    return model_config(**_pick(model_config, _check_flags(flags, model_and_diffusion_defaults(), "model")))
