"""`adm sample SNAPSHOT --num N --seed-start S --out DIR`: sample shards in ADM's npz format.

Image i is a function of (snapshot, seed S + i, settings) only, so any split of the work over
machines and batch sizes gives the same set. Labels are drawn per seed in a fixed random order (never
sorted: Inception Score depends on order). Shards `samples-<first>-<last>.npz` (arr_0 uint8 NHWC,
arr_1 labels) are written atomically; finished shards are skipped, so a rerun resumes.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch


def quantize(images: torch.Tensor) -> np.ndarray:
    """ADM's sample scripts' convention: ((x + 1) * 127.5).clamp(0, 255).to(uint8), NHWC."""
    return ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_model(path: str, device):
    from models.snapshot import load_snapshot

    snap = load_snapshot(path)
    return snap.build(device), snap


def main(argv=None, prog="adm sample") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("snapshot")
    p.add_argument("--num", type=int, required=True, help="images to sample")
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", default="250", help="timestep respacing: 250 (ancestral), ddim25 (DDIM), ...")
    p.add_argument("--classifier", help="noisy classifier snapshot for guidance")
    p.add_argument("--scale", type=float, default=1.0, help="classifier guidance scale")
    p.add_argument("--upsampler", help="upsampler snapshot: sample the cascade")
    p.add_argument("--upsampler-steps", default="250")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=1000, help="images per npz shard")
    p.add_argument("--merge", action="store_true", help="also write DIR/samples.npz with every image, in seed order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)

    from models.adm_compat import create_gaussian_diffusion
    from models.guidance import classifier_cond_fn
    from models.sampling import draw_labels, sample_cascade, sample_images

    device = torch.device(a.device)
    model, snap = load_model(a.snapshot, device)
    cfg = snap.config
    if cfg.arch != "unet":
        raise ValueError(f"{a.snapshot}: a {cfg.arch} snapshot; sampling starts from a diffusion model (unet)")
    d = snap.meta.get("diffusion", {"steps": 1000, "noise_schedule": "linear"})
    use_ddim = a.steps.startswith("ddim")
    diffusion = create_gaussian_diffusion(steps=d["steps"], noise_schedule=d["noise_schedule"],
                                          learn_sigma=cfg.learn_sigma, timestep_respacing=a.steps)
    cond_fn, num_classes = None, cfg.num_classes
    if a.classifier:
        clf, clf_snap = load_model(a.classifier, device)
        cond_fn = classifier_cond_fn(clf, a.scale)
        num_classes = num_classes or clf_snap.config.num_classes
    up = None
    if a.upsampler:
        up, up_snap = load_model(a.upsampler, device)
        ud = up_snap.meta.get("diffusion", {"steps": 1000, "noise_schedule": "linear"})
        up_diffusion = create_gaussian_diffusion(steps=ud["steps"], noise_schedule=ud["noise_schedule"],
                                                 learn_sigma=up_snap.config.learn_sigma,
                                                 timestep_respacing=a.upsampler_steps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(a.seed_start, a.seed_start + a.num))
    shards = [seeds[i:i + a.shard_size] for i in range(0, len(seeds), a.shard_size)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(seeds), unit="img", desc="sampling", disable=not sys.stderr.isatty())
    paths = []
    for shard in shards:
        path = out / f"samples-{shard[0]:08d}-{shard[-1]:08d}.npz"
        paths.append(path)
        if path.is_file():  # finished earlier: resume
            bar.update(len(shard))
            continue
        images, labels = [], []
        for i in range(0, len(shard), a.batch_size):
            batch = shard[i:i + a.batch_size]
            y = draw_labels(batch, num_classes, device) if num_classes else None
            if up is not None:
                x, _, _ = sample_cascade(model, diffusion, up, up_diffusion, batch, base_size=cfg.image_size,
                                         large_size=up_snap.config.image_size, labels=y, cond_fn=cond_fn,
                                         use_ddim=use_ddim, device=device)
            else:
                x, _ = sample_images(model, diffusion, batch, cfg.image_size, labels=y, cond_fn=cond_fn,
                                     use_ddim=use_ddim, device=device)
            images.append(quantize(x))
            labels.append(y.cpu().numpy() if y is not None else np.zeros(len(batch), np.int64))
            bar.update(len(batch))
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, arr_0=np.concatenate(images), arr_1=np.concatenate(labels))
        os.replace(tmp, path)
    bar.close()
    if a.merge:
        arrays = [np.load(pth) for pth in paths]
        tmp = out / "samples.partial.npz"
        np.savez(tmp, arr_0=np.concatenate([x["arr_0"] for x in arrays]),
                 arr_1=np.concatenate([x["arr_1"] for x in arrays]))
        os.replace(tmp, out / "samples.npz")
    print(f"{len(seeds)} samples in {len(paths)} shard(s) under {out}" + (" + samples.npz" if a.merge else ""))
    return 0
