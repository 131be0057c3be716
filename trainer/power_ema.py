"""EDM2's power-function EMA and post-hoc reconstruction (Karras et al., "Analyzing and Improving the
Training Dynamics of Diffusion Models", 2024), from the formulas.

A power-function EMA with exponent gamma averages the weights with profile p(tau) proportional to
tau^gamma on [0, t]; its update at step t is  ema <- beta_t ema + (1 - beta_t) w  with
beta_t = (1 - 1/t)^(gamma + 1). The width of the profile relative to t, sigma_rel, relates to gamma by
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)). Storing a few profiles at several times lets
one synthesise, after training, the EMA of any sigma_rel by least squares over the profiles.
"""

import numpy as np
import torch


SIGMA_REL_MIN = 0.001  # gamma about 1000; EDM2's widths run 0.01 to 0.25


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has relative width sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2) = 0 (the relation above, expanded)."""
    if not SIGMA_REL_MIN <= sigma_rel < 0.28:  # (narrower: the raw weights of the last few steps)
        raise ValueError(f"sigma_rel must lie in [{SIGMA_REL_MIN}, 0.28), got {sigma_rel}")
    inv = 1.0 / sigma_rel ** 2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def beta(step: int, gamma: float) -> float:
    """Decay at (1-based) step t; beta_1 = 0, so the first update copies the weights."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """Integral over tau of p_a(tau) p_b(tau), with the normalised profile p(tau) = (g + 1) tau^g / t^(g + 1)
    on [0, t]: (g_a+1)(g_b+1) min(t_a, t_b)^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1))."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    gs = g_a + g_b + 1
    t = np.minimum(t_a, t_b)
    # in log space (the powers of large step counts overflow otherwise), as powers of t/t_a and t/t_b <= 1:
    # the same as gs log t - (g_a+1) log t_a - (g_b+1) log t_b, without its cancellation for large exponents
    log = (np.log(g_a + 1) + np.log(g_b + 1) - np.log(gs) - np.log(t)
           + (g_a + 1) * np.log(t / t_a) + (g_b + 1) * np.log(t / t_b))
    return np.exp(log)


def posthoc_coefficients(stored: list[tuple[int, float]], target_step: int, target_gamma: float) -> np.ndarray:
    """Weights x with sum_i x_i profile_i closest (L2) to the target profile."""
    t = np.array([s for s, _ in stored], dtype=np.float64)
    g = np.array([gm for _, gm in stored], dtype=np.float64)
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, np.full_like(t, target_step), np.full_like(g, target_gamma))
    return np.linalg.lstsq(A, b, rcond=None)[0]


def reconstruct(stored: list[tuple[int, float, dict]], target_step: int, sigma_rel: float) -> dict:
    """stored: (step, gamma, state dict) of saved power-EMA profiles -> the EMA of sigma_rel at target_step."""
    x = posthoc_coefficients([(s, g) for s, g, _ in stored], target_step, sigma_rel_to_gamma(sigma_rel))
    keys = stored[0][2].keys()
    return {k: sum(float(c) * sd[k].double() for c, (_, _, sd) in zip(x, stored)).float() for k in keys}


class PowerEMA:
    """Power-function EMAs (one per sigma_rel) of a list of tensors (this rank's master shards)."""

    def __init__(self, tensors: list[torch.Tensor], sigma_rels: list[float]):
        self.sigma_rels = list(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.shadows = {s: [t.detach().clone() for t in tensors] for s in self.sigma_rels}
        self.steps = 0

    @torch.no_grad()
    def update(self, tensors: list[torch.Tensor]) -> None:
        self.steps += 1
        for s, g in zip(self.sigma_rels, self.gammas):
            torch._foreach_lerp_(self.shadows[s], tensors, 1.0 - beta(self.steps, g))

    def state_dict(self) -> dict:
        return {"sigma_rels": self.sigma_rels, "steps": self.steps,
                "shadows": {str(s): list(v) for s, v in self.shadows.items()}}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"checkpoint power-EMA widths {state['sigma_rels']} differ from {self.sigma_rels}")
        for s, tensors in state["shadows"].items():
            for dst, src in zip(self.shadows[float(s)], tensors):
                dst.copy_(src)
        self.steps = state["steps"]
