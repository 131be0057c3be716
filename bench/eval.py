"""Evaluation throughput: Inception features/s, precision/recall time (ours, fp32 and fp16 modes,
against a NumPy port of ADM's evaluator's ManifoldEstimator on the same features and machine), and
the time to merge per-shard statistics.

    .venv/bin/python bench/eval.py --out bench/results/eval-cpu.json
    .venv/bin/python bench/eval.py --ref 10000 --samples 50000 --device cuda   # the real sizes, on a GPU
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from eval.inception import extract  # noqa: E402
from eval.precision_recall import precision_recall  # noqa: E402
from eval.stats import Statistics  # noqa: E402


def adm_style_pr(ref: np.ndarray, samples: np.ndarray, k: int = 3, batch: int = 10000):
    """ADM's ManifoldEstimator algorithm (row x column batches of 10k, squared distances clamped at 0,
    k-th value by partition, one distance matrix shared by precision and recall), in NumPy float32:
    the CPU fallback of its fp16 TensorFlow arithmetic."""

    def dist(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0)

    def radii(f):
        out = np.empty(len(f), np.float32)
        for s in range(0, len(f), batch):
            d = np.concatenate([dist(f[s:s + batch], f[t:t + batch]) for t in range(0, len(f), batch)], axis=1)
            out[s:s + batch] = np.partition(d, k, axis=1)[:, k]
        return out

    r_ref, r_sam = radii(ref), radii(samples)
    ref_in = np.zeros(len(ref), bool)  # reference points inside the sample manifold (recall)
    sam_in = np.zeros(len(samples), bool)  # samples inside the reference manifold (precision)
    for s in range(0, len(ref), batch):
        for t in range(0, len(samples), batch):
            d = dist(ref[s:s + batch], samples[t:t + batch])
            ref_in[s:s + batch] |= (d <= r_sam[None, t:t + batch]).any(1)
            sam_in[t:t + batch] |= (d <= r_ref[s:s + batch, None]).any(0)
    return float(sam_in.mean()), float(ref_in.mean())


def timed(fn, repeats=1):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", type=int, default=2000, help="reference points for precision/recall (ADM: 10000)")
    p.add_argument("--samples", type=int, default=10000, help="sample points (ADM: 50000)")
    p.add_argument("--images", type=int, default=32, help="images for the features/s measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    images = (rng.random((a.images, 64, 64, 3)) * 255).astype(np.uint8)
    extract(images[:2], device=a.device)  # load the network once
    t_feat, feats = timed(lambda: extract(images, device=a.device))
    # realistic features: pool_3 of real-looking images are non-negative, ~2048-d, correlated
    base = np.abs(rng.normal(size=(a.ref + a.samples, 64)) @ rng.normal(size=(64, 2048))).astype(np.float32) / 8
    ref, samples = base[:a.ref], base[a.ref:] * 1.05
    t_ours32, pr32 = timed(lambda: precision_recall(ref, samples, device=a.device))
    t_ours16, pr16 = timed(lambda: precision_recall(ref, samples, distance="fp16", device=a.device))
    t_adm, pr_adm = timed(lambda: adm_style_pr(ref, samples))
    shards = [Statistics.of(samples[i::50]) for i in range(50)]
    t_merge, _ = timed(lambda: _merge_all(shards), repeats=3)
    result = {"device": a.device, "threads": torch.get_num_threads(),
              "features_per_s": a.images / t_feat,
              "precision_recall": {"ref": a.ref, "samples": a.samples, "dim": 2048,
                                   "ours_fp32_s": t_ours32, "ours_fp16_s": t_ours16, "adm_numpy_fp32_s": t_adm,
                                   "speedup_fp32_vs_adm": t_adm / t_ours32, "speedup_fp16_vs_adm": t_adm / t_ours16,
                                   "ours_fp32": pr32, "ours_fp16": pr16, "adm_numpy_fp32": pr_adm},
              "merge_50_shards_s": t_merge}
    write_result(result, a.out)


def _merge_all(shards):
    out = shards[0]
    for s in shards[1:]:
        out = out.merge(s)
    return out


if __name__ == "__main__":
    main()
