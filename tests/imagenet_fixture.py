"""A small real dataset in ImageNet's layouts, from images scikit-learn ships (handwritten digits and
two photographs), for the data-pipeline tests and the demo."""

from pathlib import Path

import numpy as np
from PIL import Image


def wnid(k: int) -> str:
    return f"n{k:08d}"


def make_imagenet(root: Path, per_class: int = 12, size: int = 32, val_per_class: int = 3) -> dict:
    """root/train/<wnid>/<wnid>_<n>.JPEG, root/val/ILSVRC2012_val_<n>.JPEG (flat) with
    root/LOC_val_solution.csv and root/LOC_synset_mapping.txt. Classes 0-9 are digits, class 10
    holds the two photographs (large, for cropping). Returns {relative path: class index}."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = load_sample_images().images
    labels = {}
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    names = [f"digit {k}" for k in range(10)] + ["photograph"]
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{wnid(k)} {n}\n" for k, n in enumerate(names)))
    rows = ["ImageId,PredictionString"]
    counts = {k: 0 for k in range(10)}
    val_n = 0
    for img, k in zip(digits.images, digits.target):
        k = int(k)
        arr = (img / 16.0 * 255).astype(np.uint8)
        pil = Image.fromarray(arr).resize((size, size), Image.BICUBIC).convert("RGB")
        if counts[k] < per_class:
            d = root / "train" / wnid(k)
            d.mkdir(exist_ok=True)
            path = d / f"{wnid(k)}_{counts[k]}.JPEG"
            pil.save(path, quality=95)
            labels[str(path.relative_to(root))] = k
        elif counts[k] < per_class + val_per_class:
            val_n += 1
            path = root / "val" / f"ILSVRC2012_val_{val_n:08d}.JPEG"
            pil.save(path, quality=95)
            rows.append(f"{path.stem},{wnid(k)} 0 0 {size} {size}")
            labels[str(path.relative_to(root))] = k
        else:
            continue
        counts[k] += 1
    d = root / "train" / wnid(10)
    d.mkdir()
    for i, photo in enumerate(photos):
        path = d / f"{wnid(10)}_{i}.JPEG"
        Image.fromarray(photo).save(path, quality=95)
        labels[str(path.relative_to(root))] = 10
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return labels
