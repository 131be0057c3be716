"""`adm eval compare REF.npz SAMPLE.npz`: ADM's evaluator interface and file formats.

Each file is a batch of images (`arr_0`: uint8 NHWC, optional `arr_1`: labels) or precomputed
statistics (`mu`, `sigma`, `mu_s`, `sigma_s`), or both (ADM's reference batches: 10k images for
precision/recall plus statistics of the whole split).
"""

import numpy as np

from .inception import logits_weight
from .metrics import inception_score, load_reference
from .precision_recall import precision_recall
from .stats import frechet_distance


def compare(ref_path: str, sample_path: str, batch_size: int | None = None, device=None, pr_distance: str = "fp32",
            inception_weights: str | None = None) -> dict:
    w = logits_weight(inception_weights) if inception_weights else None  # a bad path fails before any work
    ref = load_reference(ref_path, batch_size=batch_size, device=device)
    sample = load_reference(sample_path, batch_size=batch_size, device=device)
    if "resolution" in ref and "resolution" in sample and ref["resolution"] != sample["resolution"]:
        raise ValueError(f"{ref_path}: images are {ref['resolution']}x{ref['resolution']} but {sample_path} has "
                         f"{sample['resolution']}x{sample['resolution']} (compare at the same resolution)")
    result = {"fid": frechet_distance(sample["mu"], sample["sigma"], ref["mu"], ref["sigma"])}
    if "mu_s" in ref and "mu_s" in sample:
        result["sfid"] = frechet_distance(sample["mu_s"], sample["sigma_s"], ref["mu_s"], ref["sigma_s"])
    if "pool" in ref and "pool" in sample:
        result["precision"], result["recall"] = precision_recall(ref["pool"], sample["pool"], distance=pr_distance)
    if w is not None and "pool" in sample:
        result["inception_score"] = inception_score(sample["pool"].astype(np.float64) @ w.T)
    return result
