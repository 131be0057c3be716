"""`adm data bench`: images/s of the streaming loader on a shard directory."""

import math
import time

from .loader import StreamLoader
from .verify import check_resolution, read_manifest


def measure(directory, resolution: int, workers: int = 0, seconds: float = 10.0, batch_size: int = 64,
            crop: str = "center", warmup_batches: int = 2, num_slots: int | None = None,
            jpeg_draft: bool = False) -> dict:
    if not 0 < seconds < math.inf or workers < 0:  # (nan measured nothing, inf never ended)
        raise ValueError(f"--seconds must be positive and finite and --workers at least 0, got {seconds:g} and "
                         f"{workers}")
    manifest = read_manifest(directory)
    if workers > len(manifest["shards"]):
        raise ValueError(f"--workers {workers}: each loader worker reads whole shards and {directory} has "
                         f"{len(manifest['shards'])}; use --workers {len(manifest['shards'])} or fewer")
    check_resolution(directory, manifest, resolution, "--resolution")
    consumers = max(1, workers)
    # whole slots per consumer (the loader's rule), at most 64 in all unless there are more consumers, each a shard
    slots = num_slots or consumers * max(1, min(len(manifest["shards"]), 64) // consumers)
    loader = StreamLoader(directory, resolution, batch_size, crop=crop, num_workers=workers, num_slots=slots,
                          jpeg_draft=jpeg_draft)
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += len(next(it)["id"])
    elapsed = time.perf_counter() - start
    rate = images / elapsed
    return {"images_per_s": rate, "images_per_s_per_worker": rate / consumers, "workers": workers,
            "resolution": resolution, "batch_size": batch_size, "seconds": elapsed, "images": images,
            "skipped": loader.skipped, "preprocess": manifest["preprocess"], "jpeg_draft": jpeg_draft}
