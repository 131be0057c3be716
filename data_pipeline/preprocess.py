"""ADM's image preprocessing, shared by the shard writer and the loader so both give identical pixels."""

import io

import numpy as np
from PIL import Image

MAX_SCALED_PIXELS = 1 << 28  # ADM's crops scale the short side first: a 1x100000 strip would need GBs


def check_scale(size: tuple[int, int], short: int) -> None:
    """Refuse (ValueError) an image whose short side, scaled up to `short`, would take over MAX_SCALED_PIXELS."""
    w, h = size
    if short > min(size) and w * h * (short / min(size)) ** 2 > MAX_SCALED_PIXELS:
        raise ValueError(f"aspect ratio of {w}x{h}: the crop to {short} would first scale it to over "
                         f"{MAX_SCALED_PIXELS:,} pixels")


def to_rgb(image: Image.Image) -> Image.Image:
    """ADM's `convert("RGB")`, except for 16-bit greyscale (PIL mode I;16 or I), which PIL would clip to
    white above 255: scaled to 8 bits first (value / 257, so 65535 -> 255)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image, dtype=np.int64)
        if image.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = (np.clip(arr, 0, 65535) + 128) // 257
        image = Image.fromarray(arr.astype(np.uint8), "L")
    return image.convert("RGB")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: BOX halving while the short side >= 2 size, BICUBIC so the short side is
    `size`, then the central size x size crop. uint8 HWC RGB."""
    check_scale(image.size, size)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def limit_side(image: Image.Image, max_short_side: int) -> Image.Image:
    """Shrink so the short side is at most N (BOX halving, then BICUBIC), keeping the aspect ratio."""
    if min(image.size) <= max_short_side:
        return image
    while min(image.size) >= 2 * max_short_side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = max_short_side / min(image.size)
    return image.resize(tuple(max(1, round(x * scale)) for x in image.size), resample=Image.BICUBIC)


def parse_preprocess(spec: str) -> tuple[str, int]:
    """'none' | 'max-side:N' | 'center-crop:R' -> (kind, size)."""
    if spec == "none":
        return "none", 0
    kind, _, n = spec.partition(":")
    if kind in ("max-side", "center-crop") and n.isdigit() and int(n) > 0:
        return kind, int(n)
    raise ValueError(f"--preprocess {spec!r}: expected none, max-side:N or center-crop:R (N, R positive integers)")


def encode(arr_or_image, fmt: str, quality: int = 95) -> bytes:
    image = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
