"""Base samples for `adm sample UPSAMPLER --base-samples FILE.npz`: ADM's super_res_sample.py workflow, where
the upsampler reads an earlier sampling's npz (arr_0 uint8 NHWC, arr_1 labels) instead of running the base
model again. Row i of the file is upsampled with seed i, so any --seed-start split gives the same set."""

from pathlib import Path

import numpy as np
import torch

from .npzfile import images_of, open_npz, stored_header


class BaseSamples:
    """Rows [first, first + count) of a sample batch, checked against the upsampler before any work:
    uint8 images of its small size, and labels (arr_1) where it is class-conditional."""

    def __init__(self, path: str | Path, small_size: int, num_classes: int | None, first: int, count: int,
                 row0_seed: int = 0):
        """Seeds [first, first + count) are rows [first - row0_seed, ...): a whole sample batch starts at seed 0,
        a farm's sample shard at its first seed."""
        self.path, self.row0_seed = Path(path), row0_seed
        first -= row0_seed
        data = open_npz(self.path)
        if "arr_0" not in data.files:
            raise ValueError(f"--base-samples {self.path}: no arr_0; expected a sample batch (arr_0 uint8 images "
                             "NHWC, arr_1 labels), as `adm sample` and ADM's sample scripts write")
        shape, dtype = stored_header(data, "arr_0")
        self.count = shape[0]
        if len(shape) != 4 or tuple(shape[1:]) != (small_size, small_size, 3) or dtype != np.uint8:
            raise ValueError(f"--base-samples {self.path}: arr_0 is {dtype} {tuple(shape)}; the upsampler takes "
                             f"uint8 images of {small_size}x{small_size}x3 (N, H, W, C)")
        if first + count > shape[0]:
            raise ValueError(f"--seed-start {first} --num {count} asks for rows {first} to {first + count - 1} of "
                             f"--base-samples {self.path}, which holds {shape[0]} images (row i is upsampled with "
                             "seed i)")
        self.labels = None
        if "arr_1" in data.files:
            lshape = tuple(stored_header(data, "arr_1")[0])
            if lshape != (shape[0],):
                raise ValueError(f"--base-samples {self.path}: arr_1 has shape {lshape}, expected one label per "
                                 f"image ({shape[0]},)")
            self.labels = np.asarray(data["arr_1"]).astype(np.int64)
        if num_classes is not None:
            if self.labels is None:
                raise ValueError(f"--base-samples {self.path}: no arr_1 (labels), and the upsampler is "
                                 f"class-conditional ({num_classes} classes)")
            bad = (self.labels[first:first + count] < 0) | (self.labels[first:first + count] >= num_classes)
            if bad.any():
                row = first + int(np.flatnonzero(bad)[0])
                raise ValueError(f"--base-samples {self.path}: arr_1[{row}] is {self.labels[row]}, outside the "
                                 f"upsampler's {num_classes} classes")
        # a slice at a time (50,000 base images stay on disk), read through once first so a damaged file is
        # found before the upsampler runs; whole where numpy stored it in Fortran order
        self.images = images_of(data)

    def take(self, seeds: list[int]) -> tuple[torch.Tensor, np.ndarray | None]:
        """The images (uint8, N C h w) and labels of consecutive seeds."""
        if list(seeds) != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError(f"base samples are read by consecutive seeds, got {list(seeds)[:4]}...")
        rows = slice(seeds[0] - self.row0_seed, seeds[0] - self.row0_seed + len(seeds))
        images = torch.from_numpy(self.images[rows]).permute(0, 3, 1, 2)
        return images, (self.labels[rows] if self.labels is not None else None)
