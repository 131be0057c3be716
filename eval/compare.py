"""`adm eval compare REF.npz SAMPLE.npz`: ADM's evaluator interface and file formats.

Each file is a batch of images (`arr_0`: uint8 NHWC, optional `arr_1`: labels) or precomputed
statistics (`mu`, `sigma`, `mu_s`, `sigma_s`), or both (ADM's reference batches: 10k images for
precision/recall plus statistics of the whole split).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .inception import extract
from .precision_recall import precision_recall
from .stats import Statistics, frechet_distance


def load(path: str, batch_size: int, device, progress: bool) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        data = np.load(p)
    except Exception as e:
        raise ValueError(f"{p}: not an npz file ({e})") from None
    keys = set(data.files)
    out = {}
    if "arr_0" in keys:
        images = data["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{p}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        feats = extract(images, batch_size, device, progress)
        out["pool"], out["spatial"] = feats["pool"], feats["spatial"]
        pool, spatial = Statistics.of(feats["pool"]), Statistics.of(feats["spatial"])
        out.update(mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        if k in keys:  # precomputed statistics of the whole split take precedence, as in ADM
            out[k] = data[k]
    if "mu" not in out:
        raise ValueError(f"{p}: expected arr_0 (images) or mu/sigma (statistics); it has {sorted(keys)}")
    return out


def compare(ref_path: str, sample_path: str, batch_size: int = 64, device=None, pr_distance: str = "fp32",
            progress: bool = True) -> dict:
    ref = load(ref_path, batch_size, device, progress)
    sample = load(sample_path, batch_size, device, progress)
    result = {"fid": frechet_distance(sample["mu"], sample["sigma"], ref["mu"], ref["sigma"])}
    if "mu_s" in ref and "mu_s" in sample:
        result["sfid"] = frechet_distance(sample["mu_s"], sample["sigma_s"], ref["mu_s"], ref["sigma_s"])
    if "pool" in ref and "pool" in sample:
        result["precision"], result["recall"] = precision_recall(ref["pool"], sample["pool"], distance=pr_distance)
    return result


def main(argv=None, prog="adm eval") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="evaluation: FID, sFID, precision, recall")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("compare", help="ADM's evaluator: REF.npz vs SAMPLE.npz")
    p.add_argument("ref")
    p.add_argument("sample")
    p.add_argument("--json", dest="json_out", help="write the metrics here")
    p.add_argument("--pr-distance", choices=["fp32", "fp16"], default="fp32",
                   help="distance arithmetic for precision/recall (fp16: ADM's, for published numbers)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    a = parser.parse_args(argv)
    result = compare(a.ref, a.sample, a.batch_size, a.device, a.pr_distance, progress=sys.stderr.isatty())
    for k, v in result.items():
        print(f"{k}: {v:.6f}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
