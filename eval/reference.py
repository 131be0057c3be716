"""`adm eval ref SHARDS --out REF.npz`: a reference batch in ADM's format from WebDataset shards.

One pass over the split (ADM's center crop at the given resolution, no flip): statistics of every
image (mu, sigma, mu_s, sigma_s) plus `arr_0`/`arr_1`, a subset of 10k images for precision/recall
(the first ones in the loader's seeded, class-mixed order), and `meta` (resolution, source, counts),
so a reference built with other settings than the samples is refused with a clear message.
Beyond ADM's keys, `pool` holds arr_0's pool_3 features (tagged in `meta` with the network's SHA-1),
computed in the same pass, so evaluations against this file do not run Inception on arr_0 again.
"""

import json
import os
from pathlib import Path

import numpy as np

from .inception import SHA1, default_batch_size, default_device, forward_fitting, network
from .sample import save_npz_atomic
from .stats import Statistics


def build_reference(shards: str | Path, out: str | Path, resolution: int, pr_num: int = 10000,
                    limit: int | None = None, batch_size: int | None = None, device=None,
                    progress: bool = False) -> dict:
    import torch

    from adm.progress import progress as progress_bar
    from data_pipeline.loader import StreamLoader

    device = torch.device(device or default_device())
    batch_size = batch_size or default_batch_size(device)
    from data_pipeline.verify import check_resolution, read_manifest

    manifest = read_manifest(shards)
    check_resolution(shards, manifest, resolution, "--resolution")
    total = sum(s["count"] for s in manifest["shards"])
    want = min(total, limit) if limit else total
    from .precision_recall import K_NEAREST

    if min(want, pr_num) <= K_NEAREST:  # the file would be refused by every comparison
        raise ValueError(f"{shards}: {min(want, pr_num)} image(s) for precision/recall (of {total}"
                         f"{f', --limit {limit}' if limit else ''}); k={K_NEAREST} needs more than {K_NEAREST}")
    # one slot: one ordered pass; decoded by threads, in the same order (1.28M train images at 256 px: over an
    # hour of decoding on one core, while the GPU waits)
    loader = StreamLoader(shards, resolution, batch_size, flip=False, num_slots=1,
                          decode_threads=min(8, os.cpu_count() or 1))
    net = network(device)
    pool = spatial = None
    keep, keep_pool, labels, seen = [], [], [], 0
    bar = progress_bar(total=want, unit="img", desc="reference", enabled=progress)
    for batch in loader:
        first_epoch = batch["pos"][:, 1] == 0
        images = ((batch["image"][first_epoch] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        images = images.permute(0, 2, 3, 1).numpy()[: want - seen]
        if len(images):
            feats = forward_fitting(net, images, batch_size)
            p, s = Statistics.of(feats["pool"]), Statistics.of(feats["spatial"])
            pool, spatial = (p, s) if pool is None else (pool.merge(p), spatial.merge(s))
            room = pr_num - sum(len(k) for k in keep)
            if room > 0:
                keep.append(images[:room])
                keep_pool.append(feats["pool"][:room])
                labels.append(batch["label"][first_epoch].numpy()[:room])
            seen += len(images)
            bar.update(len(images))
        if seen >= want or not bool(first_epoch.all()):
            break
    bar.close()
    if seen < 2:
        raise ValueError(f"{shards}: {seen} readable image(s); a reference needs at least 2")
    meta = {"resolution": resolution, "crop": "center", "source": str(shards), "num_images": seen,
            "num_pr": int(sum(len(k) for k in keep)), "skipped": loader.skipped, "pool_features": SHA1}
    save_npz_atomic(Path(out), arr_0=np.concatenate(keep), arr_1=np.concatenate(labels),
                    pool=np.concatenate(keep_pool).astype(np.float32), mu=pool.mu,
                    sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma, meta=np.array(json.dumps(meta)))
    return meta
