"""Checks that need a GPU, against this machine's CPU, in under a minute (bench/device_run.sh runs it first):

- Inception features on the GPU (TF32 off) against the CPU's on the same images: largest differences;
- exact precision/recall: the radii and memberships are decided on float64 distances of the pairs, so the GPU
  must give the same radii, bit for bit, and the same precision and recall as the CPU;
- ADM's fp16 distance arithmetic on the GPU (as TensorFlow's GPU kernels compute it), next to the exact values;
- smoke checks of code paths only a GPU takes (each records "ok" or its error).

    python bench/device_checks.py --out checks.json
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench.eval import timed  # noqa: E402  (what it times returns NumPy: the GPU's work is done by then)
from bench.pr_workers import realistic_features  # noqa: E402
from eval.inception import extract  # noqa: E402
from eval.precision_recall import precision_recall, radii  # noqa: E402


def smoke(device: torch.device) -> dict:
    """GPU-only paths the CPU test suite cannot reach."""
    from models.adm_compat import create_gaussian_diffusion
    from models.resample import create_named_schedule_sampler

    def loss_aware_sampler():  # timesteps drawn with the trainer's CUDA generator
        s = create_named_schedule_sampler("loss-second-moment", create_gaussian_diffusion(steps=10))
        gen = torch.Generator(device).manual_seed(0)
        for _ in range(12):  # 768 draws over 10 steps fill every step's history of 10: importance sampling on
            t, _ = s.sample(64, device, generator=gen)
            s.update_with_local_losses(t, torch.rand(64, device=device))
        torch.cuda.set_sync_debug_mode("error")  # a step's update and draw never wait for the device
        try:
            s.update_with_local_losses(t, torch.rand(64, device=device, generator=gen))
            t, w = s.sample(64, device, generator=gen)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert s._warmed_up() and t.device.type == w.device.type == "cuda" and s.weights().sum() > 0

    def tf32_setting_restored():  # features in float32, the sampler's TF32 setting back after
        torch.backends.cudnn.allow_tf32 = True
        extract(np.zeros((2, 32, 32, 3), np.uint8), device=device)
        assert torch.backends.cudnn.allow_tf32

    out = {}
    for check in (loss_aware_sampler, tf32_setting_restored):
        try:
            check()
            out[check.__name__] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, the other checks go on
            out[check.__name__] = f"{type(e).__name__}: {e}"
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--ref", type=int, default=2000)
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    images = (rng.random((a.images, 64, 64, 3)) * 255).astype(np.uint8)
    on_cpu = extract(images, device="cpu")
    extract(images[:2], device=a.device)  # load and warm up
    t_feat, on_dev = timed(lambda: extract(images, device=a.device))
    features = {k: {"max_abs_diff": float(np.abs(on_dev[k] - on_cpu[k]).max()),
                    "max_rel_diff": float((np.abs(on_dev[k] - on_cpu[k]) / (np.abs(on_cpu[k]) + 1e-3)).max())}
                for k in ("pool", "spatial")}
    ref, samples = realistic_features(a.ref, a.samples, rng)
    t_cpu, pr_cpu = timed(lambda: precision_recall(ref, samples, device="cpu"))
    t_dev, pr_dev = timed(lambda: precision_recall(ref, samples, device=a.device))
    r_cpu, r_dev = radii(samples, device="cpu"), radii(samples, device=a.device)
    t16, pr16 = timed(lambda: precision_recall(ref, samples, distance="fp16", device=a.device))
    checks = smoke(torch.device(a.device)) if torch.device(a.device).type == "cuda" else {}
    write_result({
        "smoke": checks,
        "device": torch.cuda.get_device_name(0) if torch.device(a.device).type == "cuda" else "cpu",
        "torch": torch.__version__,
        "features": features | {"images": a.images, "device_s": t_feat},
        "precision_recall": {"ref": a.ref, "samples": a.samples, "cpu": pr_cpu, "device": pr_dev,
                             "identical": pr_cpu == pr_dev, "radii_identical": bool((r_cpu == r_dev).all()),
                             "cpu_s": t_cpu, "device_s": t_dev, "fp16_device": pr16, "fp16_device_s": t16},
    }, a.out)


if __name__ == "__main__":
    main()
