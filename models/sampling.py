"""Sampling entry points where image i depends only on (weights, seed i, settings).

Every sample draws its noise (and, when not given, its label) from its own generator seeded with its
seed, so the batch size, the number of devices and the order never change an image. A cascade runs
the base model, then the upsampler conditioned on the base output's uint8 pixels with the same labels;
the upsampler's noise for seed s comes from a generator of its own (seeded with `upsampler_seed(s)`), so
a cascade gives exactly the images of sampling the base model and then upsampling those samples (ADM's
super_res_sample.py, `adm sample --base-samples`), and its noise never repeats the base's.
"""

from collections.abc import Sequence

import torch

from .noise import PerSampleNoise


_MASK64 = (1 << 64) - 1
_UPSAMPLER_STREAM = 0x9E3779B97F4A7C15  # splitmix64's increment: upsampler_seed(s) is its first output from state s


def upsampler_seed(seed: int) -> int:
    """The seed of sample `seed`'s upsampler noise: splitmix64's first output from state `seed`, cut to 63
    bits. The base model's generator is seeded with `seed` itself, and seeding the upsampler's with it too
    would start its noise with the base's very numbers (the first 3 h w of them), tying the two stages'
    noise together; this one is a stream of its own, and no other sample's base seed in practice."""
    z = (int(seed) + _UPSAMPLER_STREAM) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def upsampler_noise(seeds: Sequence[int], device="cpu") -> PerSampleNoise:
    """Each sample's upsampler noise, from its own generator (see upsampler_seed)."""
    return PerSampleNoise([upsampler_seed(s) for s in seeds], device)


def draw_labels(seeds: Sequence[int], num_classes: int, device="cpu") -> torch.Tensor:
    """One label per seed, a function of that seed only (uniform over classes, never sorted)."""
    return PerSampleNoise([s * 2 + 1 for s in seeds], "cpu").randint(num_classes).to(device)


def sample_images(model, diffusion, seeds: Sequence[int], image_size: int, *, channels: int = 3, labels=None,
                  num_classes: int | None = None, cond_fn=None, use_ddim: bool = False, eta: float = 0.0,
                  clip_denoised: bool = True, model_kwargs: dict | None = None, device="cpu",
                  noise: PerSampleNoise | None = None, progress: bool = False,
                  on_step=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample len(seeds) images in [-1, 1], (N, C, H, W). Returns (images, labels).

    labels: given, or drawn per seed when num_classes is set (class-conditional model or guidance).
    on_step: called with every step's {"sample", "pred_xstart", "t"} (DDPM's progressive decoding, recorded
    from the batch itself rather than from a second run).
    """
    device = torch.device(device)
    noise = noise or PerSampleNoise(seeds, device)
    kwargs = dict(model_kwargs or {})
    if labels is None and num_classes:
        labels = draw_labels(seeds, num_classes, device)
    if labels is not None:
        labels = torch.as_tensor(labels, device=device)
        if labels.shape != (len(seeds),):
            raise ValueError(f"labels must have shape ({len(seeds)},), got {tuple(labels.shape)}")
        kwargs["y"] = labels  # for the model if class-conditional, and for the classifier (cond_fn)
        if getattr(model, "num_classes", None) is None:
            model = _without_labels(model)  # an unconditional model guided by a classifier
    elif cond_fn is not None:
        raise ValueError("classifier guidance needs labels: pass labels or num_classes")
    shape = (len(seeds), channels, image_size, image_size)
    loop = diffusion.ddim_sample_loop_progressive if use_ddim else diffusion.p_sample_loop_progressive
    extra = {"eta": eta} if use_ddim else {}
    out = None
    for out in loop(model, shape, noise=noise.randn(shape), clip_denoised=clip_denoised, cond_fn=cond_fn,
                    model_kwargs=kwargs, device=device, progress=progress, generator=noise, **extra):
        if on_step is not None:
            on_step(out)
    return out["sample"], labels


def _without_labels(model):
    """guided-diffusion's model_fn for an unconditional model under guidance: the labels in the model
    kwargs are the classifier's, not passed to the model."""
    def model_fn(x, t, y=None, **kwargs):
        return model(x, t, **kwargs)
    return model_fn


def sample_cascade(base, base_diffusion, upsampler, upsampler_diffusion, seeds: Sequence[int], *, base_size: int,
                   large_size: int, labels=None, num_classes: int | None = None, cond_fn=None,
                   use_ddim: bool = False, upsampler_ddim: bool = False, device="cpu", progress: bool = False,
                   on_step=None):
    """Base model at base_size (guided if cond_fn), then the upsampler to large_size conditioned on it.

    Only the base model is guided (as in the paper's guided stacks); the upsampler sees the same labels.
    on_step watches the base model's steps (see sample_images). The upsampler's noise is upsampler_noise(seeds):
    the result is upsample() of the base samples' pixels, whichever process sampled those.
    Returns (large images, base images, labels).
    """
    low, labels = sample_images(base, base_diffusion, seeds, base_size, labels=labels, num_classes=num_classes,
                                cond_fn=cond_fn, use_ddim=use_ddim, device=device, progress=progress,
                                on_step=on_step)
    # ADM's super_res_sample.py reads the base samples back from their uint8 npz: condition on those pixels
    pixels = ((low + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    high = upsample(upsampler, upsampler_diffusion, pixels, large_size, upsampler_noise(seeds, device), labels=labels,
                    use_ddim=upsampler_ddim, device=device, progress=progress)
    return high, low, labels


def upsample(upsampler, diffusion, low: torch.Tensor, large_size: int, noise: PerSampleNoise, *, labels=None,
             use_ddim: bool = False, device="cpu", progress: bool = False) -> torch.Tensor:
    """The upsampler at large_size conditioned on uint8 images `low` (N, C, h, w), as ADM's
    super_res_sample.py conditions on its base samples' pixels; labels are passed where the upsampler is
    class-conditional. Each image draws its noise from its own stream in `noise` (upsampler_noise(seeds) in
    the cascades and `adm sample --base-samples`). Returns (N, C, H, W) in [-1, 1]."""
    kwargs = {"low_res": low.to(device).float() / 127.5 - 1}
    if labels is not None and getattr(upsampler, "num_classes", None) is not None:
        kwargs["y"] = torch.as_tensor(labels, device=device)
    shape = (low.shape[0], low.shape[1], large_size, large_size)
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    return loop(upsampler, shape, noise=noise.randn(shape), model_kwargs=kwargs, device=device, progress=progress,
                generator=noise)
