"""Data pipeline throughput against ADM's reference loader (guided-diffusion's ImageDataset: a
folder of JPEGs, PIL full decode, BOX halving, BICUBIC, center crop), same images, same machine.

Builds ImageNet-like JPEGs (about 500x375, quality 90) from the photographs scikit-learn ships
(random crops, flips and colour shifts), then measures in one run:
  reference loader, ours from original-JPEG shards, ours from center-crop shards (images/s, one
  process), the shard writer (images/s per worker process, originals), and listing a source (us per
  image: a folder tree, the stat-per-file walk it replaced, ImageNet's tar of tars read in place).

    .venv/bin/python bench/data.py --out bench/out/data.json
"""

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from data_pipeline.bench import measure  # noqa: E402
from data_pipeline.sources import read_source  # noqa: E402
from data_pipeline.writer import source_digest, write_dataset  # noqa: E402


def make_images(root: Path, n: int, classes: int = 10) -> list[Path]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(300, h)), int(rng.integers(400, w))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        arr = photo[top:top + ch, left:left + cw].astype(np.float32) * rng.uniform(0.8, 1.2, size=3)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).resize((500, 375), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"n{i % classes:08d}_{i}.JPEG"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def reference_rate(paths, resolution, seconds):
    from guided_diffusion.image_datasets import ImageDataset
    from torch.utils.data import DataLoader

    ds = ImageDataset(resolution, [str(p) for p in paths], random_flip=True)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch, _ in DataLoader(ds, batch_size=64, shuffle=True, num_workers=0):
            images += len(batch)
            if time.perf_counter() - start >= seconds:
                break
    return images / (time.perf_counter() - start)


def naive_listing(root: Path) -> list[tuple[str, int, int]]:
    """The listing as it was: a stat per entry (is_file), a resolve per image, a stat for its size."""
    items = []
    for label, d in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for f in sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in {".jpeg", ".jpg"}):
            path = str(f.resolve())
            items.append((path, label, os.stat(path).st_size))
    return items


def listing_rates(tmp: Path, classes: int = 100, per_class: int = 200) -> dict:
    """Microseconds per image to list a folder tree (and stat its sizes for the resume digest): ours, the
    stat-per-file walk it replaced, and ImageNet's tar-of-tars read in place."""
    root = tmp / "listing"
    payload = b"\xff\xd8" + bytes(2000)
    with tarfile.open(tmp / "ILSVRC2012_img_train.tar", "w") as outer:
        for c in range(classes):
            (root / f"n{c:08d}").mkdir(parents=True)
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i in range(per_class):
                    name = f"n{c:08d}_{i}.JPEG"
                    (root / f"n{c:08d}" / name).write_bytes(payload)
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    t.addfile(info, io.BytesIO(payload))
            info = tarfile.TarInfo(f"n{c:08d}.tar")
            info.size = len(inner.getvalue())
            outer.addfile(info, io.BytesIO(inner.getvalue()))
    n, out = classes * per_class, {}
    for name, run in (("naive_walk", lambda: naive_listing(root)),
                      ("folder", lambda: source_digest(read_source(root, "folder"))),
                      ("ilsvrc_tar", lambda: source_digest(read_source(tmp / "ILSVRC2012_img_train.tar", "imagenet")))):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        out[name] = best / n * 1e6
    return {"images": n, "us_per_image": out, "folder_speedup_vs_naive": out["naive_walk"] / out["folder"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "src", a.images)
        source = read_source(tmp / "src", "folder")
        start = time.perf_counter()
        write_dataset(source, tmp / "orig", shard_size=100, workers=1, progress=False)
        write_rate = len(paths) / (time.perf_counter() - start)
        crop = f"center-crop:{a.resolution}"
        write_dataset(source, tmp / "png", shard_size=100, preprocess=crop, progress=False)
        write_dataset(source, tmp / "npy", shard_size=100, preprocess=crop, image_format="npy", progress=False)
        listing = listing_rates(tmp, classes=max(1, a.images // 10))  # 20 images listed per image decoded
        rates = {"reference": reference_rate(paths, a.resolution, a.seconds)}
        for name, path, draft in [("originals", "orig", False), ("originals_jpeg_draft", "orig", True),
                                  ("center_crop_png", "png", False), ("center_crop_npy", "npy", False)]:
            rates[name] = measure(tmp / path, a.resolution, seconds=a.seconds, num_slots=1,
                                  jpeg_draft=draft)["images_per_s"]
    result = {"resolution": a.resolution, "images": a.images, "image_size": [500, 375],
              "images_per_s_one_process": rates,
              "speedup_vs_reference": {k: v / rates["reference"] for k, v in rates.items() if k != "reference"},
              "write_images_per_s_per_worker": write_rate, "listing": listing}
    write_result(result, a.out)


if __name__ == "__main__":
    main()
