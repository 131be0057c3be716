"""The loss-aware timestep sampler's cost per training step: update its history with a step's losses,
then draw the next step's timesteps. The batched on-device update (models/resample.py) against the
same history kept one loss at a time in Python (how guided-diffusion does it).

    .venv/bin/python bench/schedule_sampler.py --out bench/out/schedule_sampler.json
"""

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_result  # noqa: E402
from models.adm_compat import create_gaussian_diffusion  # noqa: E402
from models.resample import LossSecondMomentResampler  # noqa: E402


class OneLossAtATime(LossSecondMomentResampler):
    """The baseline: the same history, appended to one loss at a time on the host."""

    def update_with_all_losses(self, ts, losses) -> None:
        H = self.history_per_term
        for t, loss in zip(ts.cpu().tolist(), losses.double().cpu().tolist()):
            if self._counts[t] == H:
                self._history[t, :-1] = self._history[t, 1:].clone()
                self._history[t, -1] = loss
            else:
                self._history[t, self._counts[t]] = loss
                self._counts[t] += 1


def per_step_ms(cls, device: torch.device, batch: int, steps: int, timesteps: int) -> float:
    s = cls(create_gaussian_diffusion(steps=timesteps))
    gen = torch.Generator(device).manual_seed(0)
    t, _ = s.sample(batch, device, generator=gen)
    for i in range(steps + 20):  # 20 warm-up steps, then timed
        if i == 20:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        s.update_with_local_losses(t, torch.rand(batch, device=device, generator=gen))
        t, w = s.sample(batch, device, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256, help="the global batch (every rank's losses are gathered)")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    device = torch.device(a.device)
    batched = per_step_ms(LossSecondMomentResampler, device, a.batch, a.steps, a.timesteps)
    looped = per_step_ms(OneLossAtATime, device, a.batch, a.steps, a.timesteps)
    write_result({"device": str(device), "batch": a.batch, "timesteps": a.timesteps, "steps": a.steps,
                  "batched_ms_per_step": round(batched, 3), "one_at_a_time_ms_per_step": round(looped, 3),
                  "speedup": round(looped / batched, 1)}, a.out)


if __name__ == "__main__":
    main()
