"""An upsampler's training step on random patches (`patch_size`) against whole images: the same model, batch and
loss (the hybrid loss of GaussianDiffusion.training_losses, forward and backward, no optimiser), timed in
alternating rounds in one process, the median of each reported with their ratio.

    .venv/bin/python bench/upsampler_patches.py --out bench/out/upsampler-patches.json   # the demo's upsampler
    .venv/bin/python bench/upsampler_patches.py --preset upsampler-64-256 --patch 128 --batch 8 --device cuda ...

The default model is the demo's (16 -> 32, 64 channels at every level) with its 16x16 patches.
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402


def demo_upsampler():
    from models.presets import get_preset

    p = get_preset("tiny-upsampler-32-64")
    return p, dataclasses.replace(p.config(), image_size=32, small_size=16, channel_mult=[2, 2, 2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help="an upsampler preset (default: the demo's upsampler)")
    p.add_argument("--patch", type=int, default=16, help="patch side, as the trainer's patch_size")
    p.add_argument("--batch", type=int, default=16, help="images per step (one rank's micro-batch)")
    p.add_argument("--iters", type=int, default=4, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench/out/upsampler-patches.json"))
    a = p.parse_args(argv)

    from models.adm_compat import create_gaussian_diffusion
    from models.config import build_model
    from models.presets import get_preset

    if a.preset:
        preset = get_preset(a.preset)
        cfg = preset.config()
    else:
        preset, cfg = demo_upsampler()
    if cfg.arch != "upsampler":
        p.error(f"--preset {a.preset}: an upsampler preset, got a {cfg.arch}")
    from trainer.config import TrainConfig

    if a.patch <= 0:
        p.error(f"--patch {a.patch}: a positive patch side (whole images are what the patches are timed against)")
    try:  # the trainer's own rules for patch_size
        TrainConfig(task="upsampler", model=cfg, patch_size=a.patch)
    except ValueError as e:
        p.error(f"--patch {a.patch}: {e}")
    factor = cfg.image_size // cfg.small_size
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    model.patch_size = a.patch
    diffusion = create_gaussian_diffusion(steps=preset.diffusion["steps"], learn_sigma=cfg.learn_sigma,
                                          noise_schedule=preset.diffusion["noise_schedule"])
    gen = torch.Generator(device).manual_seed(0)

    def step(side: int) -> None:
        x = torch.rand(a.batch, 3, side, side, device=device, generator=gen) * 2 - 1
        low = torch.nn.functional.avg_pool2d(x, factor)
        t = torch.randint(0, diffusion.num_timesteps, (a.batch,), device=device, generator=gen)
        y = torch.randint(0, cfg.num_classes, (a.batch,), device=device, generator=gen) if cfg.num_classes else None
        loss = diffusion.training_losses(model, x, t, model_kwargs={"low_res": low, "y": y})["loss"].mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(side: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(a.iters):
            step(side)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return a.batch * a.iters / (time.perf_counter() - start)

    sides = {"whole": cfg.image_size, "patch": a.patch}
    for side in sides.values():
        step(side)  # warm-up
    rates = {k: [] for k in sides}
    for _ in range(a.rounds):
        for kind, side in sides.items():
            rates[kind].append(timed(side))
    median = {k: statistics.median(v) for k, v in rates.items()}
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model": a.preset or "demo upsampler 16->32", "image_size": cfg.image_size, "small_size": cfg.small_size,
              "patch": a.patch, "batch": a.batch, "images_per_s": median, "all_images_per_s": rates,
              "patch_over_whole": median["patch"] / median["whole"],
              "pixel_ratio": (cfg.image_size / a.patch) ** 2}
    write_result(result, a.out)
    print(f"{result['model']}: whole {cfg.image_size}x{cfg.image_size} {median['whole']:.1f} img/s, "
          f"{a.patch}x{a.patch} patches {median['patch']:.1f} img/s (x{result['patch_over_whole']:.2f}; "
          f"{result['pixel_ratio']:g}x fewer pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
