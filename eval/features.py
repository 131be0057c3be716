"""Feature workers: sample shards -> per-shard Inception features and sufficient statistics.

`samples-A-B.npz` becomes `features-A-B.npz` with the pool_3 features (float32, for precision/recall),
the labels, and for pool_3 and the spatial features the count, sum and sum of outer products in
float64 (mergeable exactly: eval.stats). Written atomically; existing files are skipped (resumable).
Worker i of n takes shards i, i + n, ...; any split gives the same files.
"""

from pathlib import Path

import numpy as np

from .inception import extract
from .npzfile import READ_ERRORS, images_of, open_npz
from .sample import finished_shards, overlapping_shards, save_npz_atomic
from .stats import Statistics

MERGED = "features-merged.npz"  # all shards' features and statistics, after the metrics are published


def check_images(path: Path, data):
    """arr_0 checked from its header, then read batch by batch as it is featurized (StreamedArray)."""
    if "arr_0" not in data.files:
        raise ValueError(f"{path}: no arr_0 (images); it has {sorted(data.files)}")
    images = images_of(data)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def feature_path(out_dir: Path, sample_path: Path) -> Path:
    return Path(out_dir) / sample_path.name.replace("samples-", "features-", 1)


def featurize(sample_path: Path, out_dir: Path, batch_size: int | None = None, device=None) -> Path:
    path = feature_path(out_dir, sample_path)
    if path.is_file():
        return path
    data = open_npz(sample_path)  # a damaged file named, not a bare BadZipFile
    try:
        images = check_images(sample_path, data)
        feats = extract(images, batch_size, device)
        labels = data["arr_1"] if "arr_1" in data.files else np.zeros(len(images), np.int64)
    except READ_ERRORS as e:  # damage inside the archive, met while reading or streaming its images
        raise ValueError(f"{sample_path}: damaged ({e}); sample it again (`adm sample` with the same arguments "
                         "resamples a damaged shard)") from None
    pool, spatial = Statistics.of(feats["pool"]), Statistics.of(feats["spatial"])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_features(path, feats["pool"], labels, images.shape[1], pool, spatial)
    return path


def write_features(path: Path, pool: np.ndarray, labels: np.ndarray, resolution: int, pool_stats: Statistics,
                   spatial_stats: Statistics) -> None:
    """One features file (a shard's, or all shards' merged), atomically."""
    save_npz_atomic(path, pool=pool, labels=labels, resolution=np.array(resolution),
                    **{f"pool_{k}": v for k, v in pool_stats.to_npz().items()},
                    **{f"spatial_{k}": v for k, v in spatial_stats.to_npz().items()})


def sample_shards(samples_dir: Path) -> list[Path]:
    """The sample shards of a directory, refused when two of them share seeds (they would count twice)."""
    paths = sorted(finished_shards(samples_dir), key=seed_order)
    clash = overlapping_shards(paths)
    if clash:
        raise ValueError(f"{samples_dir}: {clash[0].name} and {clash[1].name} share seeds (sampled there with two "
                         "--shard-size or --seed-start splits); remove one split's shards")
    return paths


def featurize_dir(samples_dir: Path, out_dir: Path, index: int = 0, count: int = 1, **kw) -> list[Path]:
    return [featurize(p, out_dir, **kw) for i, p in enumerate(sample_shards(samples_dir)) if i % count == index]


def shard_feature_files(feat_dir: Path) -> list[Path]:
    return sorted((p for p in Path(feat_dir).glob("features-*.npz") if ".partial" not in p.name and p.name != MERGED),
                  key=seed_order)


def seed_order(path: Path) -> tuple:
    """A shard's place in seed order: by its first seed as a number (names pad seeds to 8 digits, so past
    10^8 the names' order is not the seeds'), then by name for other names."""
    from .sample import shard_seed_range

    seeds = shard_seed_range(Path(path).with_name(Path(path).name.replace("features-", "samples-", 1)))
    return (0, seeds, "") if seeds else (1, (0, 0), Path(path).name)


def load_features(feat_dir: Path, expected: int | None = None) -> dict:
    """Merge every features-*.npz (in seed order): pool features, labels and exactly merged statistics.
    After `compact`, the one merged file stands for them all."""
    merged = Path(feat_dir) / MERGED
    paths = [merged] if merged.is_file() else shard_feature_files(feat_dir)
    if not paths:
        raise FileNotFoundError(f"{feat_dir}: no features-*.npz (run the feature workers first)")
    pool, labels, resolutions = [], [], set()
    pool_stats = spatial_stats = None
    for p in paths:
        d = np.load(p)
        pool.append(d["pool"])
        labels.append(d["labels"])
        resolutions.add(int(d["resolution"]))
        ps = Statistics.from_npz({k[5:]: d[k] for k in d.files if k.startswith("pool_")})
        ss = Statistics.from_npz({k[8:]: d[k] for k in d.files if k.startswith("spatial_")})
        pool_stats = ps if pool_stats is None else pool_stats.merge(ps)
        spatial_stats = ss if spatial_stats is None else spatial_stats.merge(ss)
    if len(resolutions) != 1:
        raise ValueError(f"{feat_dir}: shards of different resolutions {sorted(resolutions)}")
    if expected is not None and pool_stats.n != expected:
        raise ValueError(f"{feat_dir}: {pool_stats.n} samples featurized, expected {expected} (a shard is missing)")
    return {"pool": np.concatenate(pool), "labels": np.concatenate(labels), "pool_stats": pool_stats,
            "spatial_stats": spatial_stats, "resolution": resolutions.pop()}


def compact(feat_dir: Path) -> Path:
    """Once the metrics are published: one file with every pool feature and the merged statistics in place
    of the per-shard files, whose float64 sums of outer products (2048^2 and 2023^2) take 64 MB each,
    about 3 GB for a 50k evaluation. Written before anything is deleted, so a crash loses nothing."""
    feat_dir = Path(feat_dir)
    shards = shard_feature_files(feat_dir)
    if (feat_dir / MERGED).is_file():  # (shards left beside it: a compaction killed while deleting them)
        for p in shards:
            p.unlink(missing_ok=True)
        return feat_dir / MERGED
    if not shards:
        return feat_dir / MERGED
    if len(shards) == 1:  # already what the merged file would hold
        shards[0].replace(feat_dir / MERGED)
        return feat_dir / MERGED
    f = load_features(feat_dir)
    write_features(feat_dir / MERGED, f["pool"], f["labels"], f["resolution"], f["pool_stats"], f["spatial_stats"])
    for p in shards:
        p.unlink()
    return feat_dir / MERGED
