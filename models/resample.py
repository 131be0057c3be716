"""Timestep samplers for training: uniform, and importance sampling by the loss's second moment.

`sample` returns (t, w) with t ~ p and w = 1 / (T p_t), so mean(loss * w) is unbiased for the uniform
average. The loss-aware sampler's history must be identical on every rank: the trainer passes a
`sync` callback that gathers (timesteps, losses) from all ranks (models/ never touches
torch.distributed); without one the sampler sees only local losses.
"""

from collections.abc import Callable

import torch

SyncFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ScheduleSampler:
    num_timesteps: int

    def weights(self) -> torch.Tensor:
        """Unnormalised float64 sampling weights, one per timestep."""
        raise NotImplementedError

    def sample(self, batch_size: int, device="cpu", generator: torch.Generator | None = None):
        w = self.weights()
        p = w / w.sum()
        if generator is not None:  # multinomial draws on its generator's device (a CUDA one in training)
            p = p.to(generator.device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (len(p) * p[t])
        return t.to(device), weights.float().to(device)


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.num_timesteps = diffusion.num_timesteps

    def weights(self) -> torch.Tensor:
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, device="cpu", generator: torch.Generator | None = None):
        # uniform: no multinomial, no host round trip
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator,
                          device=generator.device if generator is not None else device)
        return t.to(device), torch.ones(batch_size, device=device)


class LossAwareSamplerMixin:
    """Marks samplers that learn from the losses (`update_with_local_losses`)."""



LossAwareSampler = LossAwareSamplerMixin  # guided-diffusion's name for it


class LossSecondMomentResampler(ScheduleSampler, LossAwareSamplerMixin):
    """p_t proportional to sqrt(E[loss_t^2]) over the last `history_per_term` losses of each t,
    mixed with `uniform_prob` of uniform; uniform until every t has a full history.

    The history lives on the device of the losses it is given (the GPU in training) and is updated and
    read there with whole-tensor operations: no Python loop over the batch and no host round trip per
    step. `state_dict` gives it back on the host, oldest loss first in each row.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001,
                 sync: SyncFn | None = None):
        self.num_timesteps = diffusion.num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.sync = sync
        self._history = torch.zeros(self.num_timesteps, history_per_term, dtype=torch.float64)
        self._counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    def weights(self) -> torch.Tensor:
        w = (self._history ** 2).mean(dim=-1).sqrt()
        w = w / w.sum()
        w = w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        # uniform until warmed up, decided on the device (a Python `if` would wait for it)
        return torch.where(self._counts.eq(self.history_per_term).all(), w, torch.ones_like(w))

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        ts, losses = local_ts.detach(), local_losses.detach()
        if self.sync is not None:
            ts, losses = self.sync(ts, losses)
        self.update_with_all_losses(ts, losses)

    def update_with_all_losses(self, ts, losses) -> None:
        """Append each loss to its timestep's history in the order given, dropping the oldest beyond
        `history_per_term`; equal to doing so one loss at a time. A NaN or infinite loss (a step the trainer
        then skips) is left out: in the history it would make every weight NaN until 10 newer losses of its
        timestep pushed it out."""
        ts = torch.as_tensor(ts).long()
        losses = torch.as_tensor(losses, dtype=torch.float64, device=ts.device)
        self._to(ts.device)
        T, H = self.num_timesteps + 1, self.history_per_term
        # the non-finite go to an extra timestep row T - 1, dropped at the end (no boolean mask: no host sync)
        ts = torch.where(torch.isfinite(losses), ts, T - 1)
        self._history = torch.cat([self._history, self._history.new_zeros(1, H)])
        self._counts = torch.cat([self._counts, self._counts.new_zeros(1)])
        # this batch's losses grouped by timestep, in their order within each group
        order = torch.sort(ts, stable=True).indices
        ts, losses = ts[order], losses[order]
        # counted by scatter_add (bincount reads its maximum back to the host)
        new = torch.zeros(T, dtype=torch.long, device=ts.device).scatter_add_(0, ts, torch.ones_like(ts))
        nth = torch.arange(len(ts), device=ts.device) - (new.cumsum(0) - new)[ts]  # index within its group
        # row t becomes the last H of (its c_t old losses, then its new ones): `drop` from the front
        total = self._counts + new
        kept = total.clamp(max=H)
        drop = total - kept
        # scattered into column H, discarded, what falls off the front: fixed shapes, no boolean masks
        # (a masked index would wait for the device to count the mask)
        hist = self._history.new_zeros(T, H + 1)
        col = torch.arange(H, device=ts.device).expand(T, H)
        old_pos = col - drop[:, None]
        old_pos = torch.where((col < self._counts[:, None]) & (old_pos >= 0), old_pos, H)
        hist[torch.arange(T, device=ts.device)[:, None].expand(T, H), old_pos] = self._history
        new_pos = self._counts[ts] + nth - drop[ts]
        hist[ts, torch.where(new_pos >= 0, new_pos, H)] = losses
        self._history, self._counts = hist[:-1, :H].contiguous(), kept[:-1]

    def _to(self, device: torch.device) -> None:
        if self._history.device != device:
            self._history, self._counts = self._history.to(device), self._counts.to(device)

    def _warmed_up(self) -> bool:
        return bool((self._counts == self.history_per_term).all())

    def state_dict(self) -> dict:
        return {"history": self._history.cpu().clone(), "counts": self._counts.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self._history.copy_(state["history"])
        self._counts.copy_(state["counts"])


def create_named_schedule_sampler(name: str, diffusion, sync: SyncFn | None = None) -> ScheduleSampler:
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion, sync=sync)
    raise ValueError(f"unknown schedule sampler {name!r}; use 'uniform' or 'loss-second-moment'")
