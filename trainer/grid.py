"""A small image grid sampled from the EMA weights, written with every snapshot (rank 0)."""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.adm_compat import diffusion_from_preset
from models.config import build_model
from models.respace import space_timesteps
from models.sampling import sample_images


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as ADM's sample scripts quantise."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def tile(arr: np.ndarray, cols: int) -> Image.Image:
    n, h, w, c = arr.shape
    rows = -(-n // cols)
    canvas = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, q = divmod(i, cols)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)


def save_grid(grid: Image.Image, path: Path) -> None:
    """The PNG in place whole: the report, which the evaluation schedule rewrites while the training runs,
    embeds the newest grids as they are, and a grid cut short (a kill, a full disk) would stay a broken image."""
    from .checkpoint import write_bytes_atomic

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def grid_respacing(steps: int, wanted: int = 25) -> str:
    """DDIM's 25 steps for the grids: ddim25 (an integer stride) where one exists, else 25 evenly spread
    steps, and every step of a shorter process (diffusion.steps=30 or 8 has no stride giving 25)."""
    wanted = min(wanted, steps)
    try:
        space_timesteps(steps, f"ddim{wanted}")
        return f"ddim{wanted}"
    except ValueError:
        return str(wanted)


@torch.no_grad()
def sample_grid(state_dict: dict, cfg, device) -> Image.Image:
    # building a model draws initial weights from the global RNG; training's RNG stream (dropout) must
    # not depend on whether a grid was drawn, or resumed runs would diverge from uninterrupted ones
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _sample_grid(state_dict, cfg, device)


def _sample_grid(state_dict: dict, cfg, device) -> Image.Image:
    m = cfg.model
    model = build_model(m)
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device).eval()
    diffusion = diffusion_from_preset(cfg.diffusion.for_sampling(), m.learn_sigma,
                                      grid_respacing(cfg.diffusion.steps))
    n = cfg.grid_size ** 2
    # one class per column, spread over the classes (11 classes, 4 columns: 0, 2, 5, 8); rows are seeds
    labels = (torch.arange(n) % cfg.grid_size) * m.num_classes // cfg.grid_size if m.num_classes else None
    images, _ = sample_images(model, diffusion, list(range(n)), m.image_size, labels=labels, use_ddim=True,
                              device=device)
    return tile(to_uint8(images), cfg.grid_size)
