"""The reducer: merged statistics + reference -> FID, sFID, precision, recall (and Inception Score).

The reference is ADM's format (arr_0 images for precision/recall, mu/sigma/mu_s/sigma_s statistics of
the whole split). Its Inception features are computed once and cached by content digest.
"""

import os
from pathlib import Path

import numpy as np

from .digest import remembered_digest
from .features import check_images
from .inception import default_device, extract
from .npzfile import READ_ERRORS, describe, open_npz, stored_shape, stored_statistics
from .precision_recall import precision_recall
from .settings import EVALUATOR_VERSION
from .stats import Statistics, frechet_distance, sqrtm_psd


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's evaluator: softmax of the unbiased logits, in sample order (never shuffled), splits of
    split_size; the mean over splits of exp(mean KL(p(y|x) || p(y)))."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    scores = []
    for s in range(0, len(log_p), split_size):
        lp = log_p[s:s + split_size]
        p = np.exp(lp)
        kl = (p * (lp - np.log(p.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def user_cache() -> Path:
    """Where `adm eval compare` and `adm eval metrics` keep a reference's features between calls: $ADM_CACHE, else
    $XDG_CACHE_HOME/adm, else ~/.cache/adm (the farm keeps its own per run)."""
    if os.environ.get("ADM_CACHE"):
        return Path(os.environ["ADM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adm"


def load_reference(path: str | Path, cache_dir: Path | None = None, batch_size=None, device=None) -> dict:
    """{mu, sigma, mu_s, sigma_s, pool (if images), resolution (if images), meta}; clear errors by key."""
    p = Path(path)
    data = open_npz(p)
    info = describe(p, data)  # every header check before any image is read
    stored = stored_statistics(p, data, info)  # and the stored statistics' values
    try:
        return _load(p, data, info, stored, cache_dir, batch_size, device)
    except READ_ERRORS as e:  # a damaged member met while reading it
        raise ValueError(f"{p}: damaged npz ({type(e).__name__}: {e})") from None


def _load(p: Path, data, info, stored: dict, cache_dir, batch_size, device) -> dict:
    out = {"meta": info.meta}
    # by content and evaluator version: a new version (another network arithmetic) featurizes anew
    cached = None
    if cache_dir:
        cached = Path(cache_dir) / f"ref-{remembered_digest(p, Path(cache_dir))}.{EVALUATOR_VERSION}.npz"
    if info.images is not None:
        if own_pool_features(data, out["meta"]):  # `adm eval ref` stored them: no Inception pass here
            out.update(pool=data["pool"], resolution=int(info.images[1]))
            stats = {}
        elif cached is not None and cached.is_file():
            c = np.load(cached)
            out.update(pool=c["pool"], resolution=int(c["resolution"]))
            stats = {k: c[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
        else:
            images = check_images(p, data)
            feats = extract(images, batch_size, device, progress=True)  # (a metrics job's log: a line a minute)
            pool, spatial = Statistics.of(feats["pool"]), Statistics.of(feats["spatial"])
            stats = dict(mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
            out.update(pool=feats["pool"], resolution=images.shape[1])
            if cached is not None:
                from .sample import save_npz_atomic
                cached.parent.mkdir(parents=True, exist_ok=True)
                save_npz_atomic(cached, pool=feats["pool"], resolution=np.array(images.shape[1]), **stats)
        out.update(stats)
    out.update(stored)  # the whole split's statistics take precedence over arr_0's
    if cached is not None:
        out.update(_reference_roots(out, cached.with_name(cached.stem + "-sqrt.npz")))
    return out


def own_pool_features(data, meta: dict) -> bool:
    """True when the file carries arr_0's pool_3 features from this very network (our references do)."""
    from .inception import SHA1

    if meta.get("pool_features") != SHA1 or not {"pool", "mu", "sigma", "mu_s", "sigma_s"} <= set(data.files):
        return False
    return stored_shape(data, "pool") == (stored_shape(data, "arr_0")[0], 2048)


def _reference_roots(ref: dict, path: Path) -> dict:
    """sqrt(sigma) and sqrt(sigma_s) of a reference, computed once per reference file: an eigh of a
    2048x2048 matrix each, otherwise repeated by every evaluation against it."""
    if path.is_file():
        c = np.load(path)
        return {k: c[k] for k in c.files}
    roots = {f"sqrt_{k}": sqrtm_psd(np.asarray(ref[k], np.float64)) for k in ("sigma", "sigma_s") if k in ref}
    from .sample import save_npz_atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(path, **roots)
    return roots


def reduce(features: dict, ref: dict, ref_name: str = "reference", pr_distance: str = "fp32", comm=None,
           logits_w: np.ndarray | None = None, device=None) -> dict:
    """Metrics of merged sample features against a loaded reference; precision/recall on `device` (default: this
    rank's GPU if there is one; fp32 distances give the same numbers on any device)."""
    pool, spatial = features["pool_stats"], features["spatial_stats"]
    want = ref.get("meta", {}).get("resolution") or ref.get("resolution")
    if want and features.get("resolution") and int(want) != int(features["resolution"]):
        raise ValueError(f"{ref_name}: built at resolution {want}, but the samples are {features['resolution']}x"
                         f"{features['resolution']} (evaluate against a reference of the samples' resolution)")
    result = {"num_samples": pool.n,
              "fid": frechet_distance(pool.mu, pool.sigma, ref["mu"], ref["sigma"], ref.get("sqrt_sigma"))}
    if "mu_s" in ref:
        result["sfid"] = frechet_distance(spatial.mu, spatial.sigma, ref["mu_s"], ref["sigma_s"],
                                          ref.get("sqrt_sigma_s"))
    if "pool" in ref:
        result["precision"], result["recall"] = precision_recall(ref["pool"], features["pool"], distance=pr_distance,
                                                                 comm=comm, device=device or default_device())
    if logits_w is not None:
        result["inception_score"] = inception_score(features["pool"].astype(np.float64) @ logits_w.T)
    return result
