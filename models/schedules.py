"""Noise schedules (beta_t for code index t = 0..T-1), all arithmetic in float64."""

import math
from collections.abc import Callable, Sequence

import torch


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> torch.Tensor:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta) for a continuous alpha_bar on [0, 1]."""
    return torch.tensor([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                         for i in range(num_steps)], dtype=torch.float64)


def linear_betas(num_steps: int) -> torch.Tensor:
    """DDPM's 1e-4 .. 0.02 over 1000 steps, rescaled so any T gives the same overall noise level."""
    if num_steps < 20:  # its last beta, 0.02 x 1000 / T, passes 1 (at T = 20 it is 1: alpha-bar 0, which only
        # an x0-predicting model samples from; guided-diffusion allows it too)
        raise ValueError(f"the linear schedule needs at least 20 steps, got {num_steps} (its last beta would be "
                         f"{20 / num_steps:g}, more than 1); use the cosine schedule for fewer")
    scale = 1000 / num_steps
    return torch.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_alpha_bar(tau: float, s: float = 0.008) -> float:
    return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_steps: int) -> torch.Tensor:
    """Improved DDPM's cosine schedule (offset s = 0.008), betas capped at 0.999."""
    return betas_for_alpha_bar(num_steps, cosine_alpha_bar)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def get_named_beta_schedule(schedule: str | Sequence[float] | torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
    """"linear" or "cosine" with T steps, or an explicit per-step array of betas (as the 2015 paper
    allows: any schedule with 0 < beta_t < 1), returned as float64."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {schedule!r}; use one of {', '.join(SCHEDULES)} "
                             "or pass the betas as an array")
        if not num_steps or num_steps <= 0:
            raise ValueError(f"the {schedule} schedule needs a positive number of steps, got {num_steps}")
        return SCHEDULES[schedule](num_steps)
    betas = torch.as_tensor(schedule, dtype=torch.float64).flatten()
    if num_steps is not None and len(betas) != num_steps:
        raise ValueError(f"the beta array has {len(betas)} entries but {num_steps} steps were asked for")
    if len(betas) == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError("betas must be a non-empty array with every entry in (0, 1]")
    return betas
