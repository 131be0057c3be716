"""Per-sample transforms for training: ADM center crop, the classifier's random-resized crop, random
flip, the upsampler's (high, low) pair; the loader scales whole batches to [-1, 1]. Randomness comes
from a generator the loader seeds per sample, so a sample's pixels depend only on (seed, epoch, sample)."""

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .preprocess import center_crop_arr, check_scale, to_rgb

CROPS = ("center", "random-resized")


def random_crop_arr(image: Image.Image, size: int, rng, min_frac: float = 0.8) -> np.ndarray:
    """ADM's classifier crop: short side uniform in [size, ceil(size / min_frac)], BOX halving then
    BICUBIC to it, then a uniformly placed size x size crop."""
    lo, hi = size, math.ceil(size / min_frac)
    short = int(rng.integers(lo, hi + 1))
    check_scale(image.size, short)
    while min(image.size) >= 2 * short:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = short / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    return arr[top:top + size, left:left + size]


def area_downsample(arr: np.ndarray, small: int) -> np.ndarray:
    """Average over factor x factor blocks (= torch's 'area' interpolation for an integer factor), float32."""
    h = arr.shape[0]
    if h % small:
        raise ValueError(f"the low-resolution size {small} must divide the resolution {h}")
    f = h // small
    return arr.reshape(small, f, small, f, arr.shape[2]).astype(np.float32).mean(axis=(1, 3))


class SampleRandom:
    """A tiny counter-based generator (splitmix64) for per-sample decisions: seeded by a tuple of
    ints, ~1 us to create (numpy's default_rng costs ~30 us, which shows at thousands of images/s)."""

    MASK = (1 << 64) - 1

    def __init__(self, *key: int):
        state = 0x9E3779B97F4A7C15
        for k in key:
            state = self._mix((state ^ (int(k) & self.MASK)) & self.MASK)
        self.state = state

    @classmethod
    def _mix(cls, z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & cls.MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & cls.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & cls.MASK
        return z ^ (z >> 31)

    def _next(self) -> int:
        self.state = self._mix(self.state)
        return self.state

    def random(self) -> float:
        return (self._next() >> 11) / float(1 << 53)

    def integers(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        return low + self._next() % (high - low)


@dataclass
class Transform:
    resolution: int
    crop: str = "center"  # center (ADM diffusion) | random-resized (ADM classifier)
    flip: bool = True  # random horizontal flip, p = 0.5
    small_size: int = 0  # > 0: also return the area-downsampled low-resolution image (upsampler)
    jpeg_draft: bool = False  # faster: decode JPEGs at a reduced DCT scale instead of BOX-halving after a full decode;
    # not bit-exact with ADM: ~7 of 255 levels mean difference on a photograph (tests/test_data_loader.py)
    patch: int = 0  # > 0 (upsampler): a random patch x patch crop at a multiple of the upsampling factor, low_res alike

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if self.small_size and self.resolution % self.small_size:
            raise ValueError(f"small_size {self.small_size} must divide resolution {self.resolution}")
        if self.patch and not (self.small_size and 0 < self.patch < self.resolution
                               and self.patch % (self.resolution // self.small_size) == 0):
            raise ValueError(f"patch {self.patch}: needs small_size, must be less than resolution {self.resolution} and "
                             f"a multiple of the upsampling factor (resolution / small_size)")

    def decode(self, data: bytes):
        if data[:6] == b"\x93NUMPY":  # stored pre-cropped as raw uint8 HWC (fastest to read)
            return np.load(io.BytesIO(data))
        image = Image.open(io.BytesIO(data))
        if self.jpeg_draft and image.format in ("JPEG", "MPO"):
            # DCT scaling in place of ADM's BOX halvings: the largest reduction (1/2, 1/4, 1/8) that keeps
            # the short side >= what the crop needs, i.e. the same number of halvings ADM's loop does
            need = math.ceil(self.resolution / 0.8) if self.crop == "random-resized" else self.resolution
            image.draft("RGB", (need * image.size[0] // min(image.size), need * image.size[1] // min(image.size)))
        return to_rgb(image)

    def __call__(self, data: bytes, rng) -> dict:
        """uint8 CHW `image` (and float32 0..255 CHW `low_res`); the loader scales batches to [-1, 1]."""
        image = self.decode(data)
        if isinstance(image, np.ndarray):
            if image.shape[:2] != (self.resolution, self.resolution) or self.crop != "center":
                image = Image.fromarray(image)
        if isinstance(image, np.ndarray):
            arr = image  # stored pre-cropped at write time: already the exact crop
        elif image.size == (self.resolution, self.resolution) and self.crop == "center":
            arr = np.asarray(image)
        elif self.crop == "center":
            arr = center_crop_arr(image, self.resolution)
        else:
            arr = random_crop_arr(image, self.resolution, rng)
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        small = self.small_size
        if self.patch:  # at whole low-resolution pixels, so its low_res is the same crop of the image's low_res
            factor = self.resolution // small
            top, left = (factor * rng.integers(0, (self.resolution - self.patch) // factor + 1) for _ in range(2))
            arr, small = arr[top:top + self.patch, left:left + self.patch], self.patch // factor
        out = {"image": np.ascontiguousarray(arr.transpose(2, 0, 1))}
        if small:
            out["low_res"] = np.ascontiguousarray(area_downsample(arr, small).transpose(2, 0, 1))
        return out
