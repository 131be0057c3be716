"""Sampling with fewer steps: choose a subset of the original timesteps and re-derive the betas.

The network always receives the original timestep index (optionally rescaled to 0..1000).
"""

import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The original steps to keep.

    section_counts: "ddimN" (the smallest integer stride giving exactly N steps, as the DDIM paper),
    a comma list / sequence of per-section step counts ("250", "90,60,60,20,20": the range is cut into
    equal sections, the first T mod k one step longer, each section evenly strided including both
    its ends), or "" / None for all steps.
    """
    if section_counts in (None, ""):
        return set(range(num_timesteps))
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep respacing {section_counts!r}: expected ddimN with an integer N") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"timestep respacing {section_counts!r}: no integer stride gives exactly {desired} "
                             f"of {num_timesteps} steps")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep respacing {section_counts!r}: expected 'ddimN' or comma-separated "
                             "integers") from None
    counts = list(section_counts)
    if not counts or any(c < 0 for c in counts) or not sum(counts):  # (a section of 0 is skipped, as ADM does)
        raise ValueError(f"timestep respacing {counts}: the sections need step counts of 0 or more, a positive "
                         "number in all")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"timestep respacing: section {i} has {size} steps, cannot take {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac_stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the base process's steps (same marginals q(x_t | x_0) on them)."""

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        if not self.use_timesteps or min(self.use_timesteps) < 0 or max(self.use_timesteps) >= base.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{base.num_timesteps - 1}")
        kept = sorted(self.use_timesteps)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        abar = base.alphas_cumprod[self.timestep_map]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        kwargs["betas"] = 1 - abar / prev
        super().__init__(**kwargs)
        self._maps: dict = {}

    def _map_for(self, device) -> torch.Tensor:
        if device not in self._maps:
            self._maps[device] = self.timestep_map.to(device)
        return self._maps[device]

    def _wrap(self, fn):
        if fn is None or isinstance(fn, _OriginalTimesteps):
            return fn
        return _OriginalTimesteps(fn, self, self.rescale_timesteps, self.original_num_steps)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap(cond_fn), *args, **kwargs)

    def _scale_timesteps(self, t):
        return t  # the wrapper maps (and rescales) to the original indices


class _OriginalTimesteps:
    """Calls fn(x, original_index[t], ...) for a respaced index t."""

    def __init__(self, fn, spaced: SpacedDiffusion, rescale: bool, original_num_steps: int):
        self.fn, self.spaced, self.rescale, self.original_num_steps = fn, spaced, rescale, original_num_steps

    def __call__(self, x, ts, **kwargs):
        new_ts = self.spaced._map_for(ts.device)[ts]
        if self.rescale:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.fn(x, new_ts, **kwargs)
