"""`adm eval compare REF.npz SAMPLE.npz`: ADM's evaluator interface and file formats.

Each file is a batch of images (`arr_0`: uint8 NHWC, optional `arr_1`: labels) or precomputed
statistics (`mu`, `sigma`, `mu_s`, `sigma_s`), or both (ADM's reference batches: 10k images for
precision/recall plus statistics of the whole split).
"""

from pathlib import Path

import numpy as np

from .inception import default_device, logits_weight
from .metrics import own_pool_features, inception_score, load_reference
from .npzfile import FEATURE_DIMS, READ_ERRORS, NpzInfo, describe, images_of, open_npz, stored_statistics
from .precision_recall import K_NEAREST as K, precision_recall
from .stats import frechet_distance


def compare(ref_path: str, sample_path: str, batch_size: int | None = None, device=None, pr_distance: str = "fp32",
            inception_weights: str | None = None, cache_dir: Path | None = None) -> dict:
    """ADM's evaluator on two files; `cache_dir`: where the reference's features are kept between calls (by its
    content), so that comparing many sample files with one reference batch puts its images through Inception
    once."""
    w = logits_weight(inception_weights) if inception_weights else None  # a bad path fails before any work
    infos = describe(ref_path), describe(sample_path)
    check_pair(*infos)  # both files, before any image is featurized
    for info in infos:  # and the values of the statistics they store
        stored_statistics(info.path, open_npz(info.path), info)
    for info in infos:  # and each archive's CRC, read through once, before Inception runs on either file
        read_through(info)
    ref = load_reference(ref_path, cache_dir=cache_dir, batch_size=batch_size, device=device)
    sample = load_reference(sample_path, batch_size=batch_size, device=device)
    result = {"fid": frechet_distance(sample["mu"], sample["sigma"], ref["mu"], ref["sigma"])}
    if "mu_s" in ref and "mu_s" in sample:
        result["sfid"] = frechet_distance(sample["mu_s"], sample["sigma_s"], ref["mu_s"], ref["sigma_s"])
    if "pool" in ref and "pool" in sample:
        result["precision"], result["recall"] = precision_recall(ref["pool"], sample["pool"], distance=pr_distance,
                                                                 device=device or default_device())
    if w is not None and "pool" in sample:
        result["inception_score"] = inception_score(sample["pool"].astype(np.float64) @ w.T)
    return result


def read_through(info: NpzInfo) -> None:
    """The images a comparison will featurize, read through once (zip's CRC): damage in the second file must
    be found before the first one's Inception pass (a minute on a GPU for 10k images, hours on CPUs)."""
    data = open_npz(info.path)
    if info.images is None or own_pool_features(data, info.meta):  # nothing of it goes through Inception
        return
    try:
        images_of(data)
    except READ_ERRORS as e:
        raise ValueError(f"{info.path}: damaged npz ({type(e).__name__}: {e})") from None


def check_pair(ref: NpzInfo, sample: NpzInfo) -> None:
    """What two files must agree on to be compared, known from their headers."""
    if ref.images and sample.images and ref.images[1:3] != sample.images[1:3]:
        (rh, rw), (sh, sw) = ref.images[1:3], sample.images[1:3]
        raise ValueError(f"{ref.path}: images are {rh}x{rw} but {sample.path} has {sh}x{sw} "
                         "(compare at the same resolution)")
    for key in ("mu", "mu_s"):
        a, b = ref.feature_dim(key), sample.feature_dim(key)
        if a and b and a != b:
            raise ValueError(f"{ref.path}: {key} has {a} dimensions, {sample.path}'s {b} dimensions "
                             f"(ADM's statistics: mu {FEATURE_DIMS['mu']}, mu_s {FEATURE_DIMS['mu_s']})")
    if ref.images and sample.images and min(ref.images[0], sample.images[0]) <= K:
        small = ref if ref.images[0] <= K else sample
        raise ValueError(f"{small.path}: arr_0 holds {small.images[0]} images; precision/recall (k={K}) needs "
                         f"more than {K} in each file")
