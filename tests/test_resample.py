"""Timestep samplers, and the progressive / reverse samplers."""

import pytest
import torch

from models import gaussian_diffusion as gd
from models.resample import LossAwareSampler, LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from models.schedules import get_named_beta_schedule


def diffusion(T=20, var=gd.ModelVarType.FIXED_SMALL):
    return gd.GaussianDiffusion(betas=get_named_beta_schedule("cosine", T), model_mean_type=gd.ModelMeanType.EPSILON,
                                model_var_type=var, loss_type=gd.LossType.MSE)


def test_uniform_sampler():
    s = UniformSampler(diffusion())
    t, w = s.sample(5000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 19 and torch.equal(w, torch.ones(5000))
    counts = torch.bincount(t, minlength=20).double()
    assert (counts / 5000 - 0.05).abs().max() < 0.02


def test_loss_second_moment_weights_and_sync():
    calls = []

    def sync(ts, losses):  # stands in for the trainer's all-gather: a second rank saw the same
        calls.append(len(ts))
        return torch.cat([ts, ts]), torch.cat([losses, losses])

    s = create_named_schedule_sampler("loss-second-moment", diffusion(), sync=sync)
    assert isinstance(s, LossSecondMomentResampler) and isinstance(s, LossAwareSampler)  # (guided-diffusion's name)
    assert torch.equal(s.weights(), torch.ones(20, dtype=torch.float64))  # uniform until warmed up
    losses = torch.arange(1, 21, dtype=torch.float64)  # loss_t = t + 1
    for _ in range(5):  # 5 local rounds x 2 ranks = 10 = history_per_term
        s.update_with_local_losses(torch.arange(20), losses)
    assert calls == [20] * 5
    w = s.weights()
    expected = losses / losses.sum() * (1 - 0.001) + 0.001 / 20  # sqrt(mean(loss^2)) = loss here
    torch.testing.assert_close(w, expected)
    t, iw = s.sample(20000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(iw, (1 / (20 * expected[t])).float())
    # importance weights make the weighted mean of losses unbiased for the uniform mean
    assert (losses[t] * iw.double()).mean().item() == pytest.approx(losses.mean().item(), rel=0.03)
    state = s.state_dict()
    fresh = LossSecondMomentResampler(diffusion())
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.weights(), w)
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("importance", diffusion())


def _sequential_update(history, counts, ts, losses):
    """The loss history updated one loss at a time, in plain Python (the oracle for the batched update)."""
    H = history.shape[1]
    history, counts = history.tolist(), counts.tolist()
    for t, loss in zip(ts.tolist(), losses.tolist()):
        if counts[t] == H:
            history[t] = history[t][1:] + [loss]
        else:
            history[t][counts[t]] = loss
            counts[t] += 1
    return torch.tensor(history, dtype=torch.float64), torch.tensor(counts)


@pytest.mark.parametrize("history_per_term", [1, 3, 10])
def test_batched_history_update_equals_one_loss_at_a_time(history_per_term):
    """Batches with repeats (more of one timestep than its history holds), some timesteps absent, and
    the warm-up point crossed: the batched update keeps exactly the last losses in order."""
    T = 13
    s = LossSecondMomentResampler(diffusion(T), history_per_term=history_per_term)
    g = torch.Generator().manual_seed(7)
    history, counts = torch.zeros(T, history_per_term, dtype=torch.float64), torch.zeros(T, dtype=torch.long)
    for size in [0, 1, 5, 40, 2, 64, 7, 300, 3]:
        ts = torch.randint(0, T if size != 40 else 4, (size,), generator=g)  # 40 losses in 4 timesteps
        losses = torch.rand(size, generator=g, dtype=torch.float64) + torch.arange(size) * 1e-3
        s.update_with_all_losses(ts, losses)
        history, counts = _sequential_update(history, counts, ts, losses)
        state = s.state_dict()
        assert torch.equal(state["counts"], counts)
        assert torch.equal(state["history"], history)
        warmed = bool((counts == history_per_term).all())
        assert s._warmed_up() == warmed
        if not warmed:
            assert torch.equal(s.weights(), torch.ones(T, dtype=torch.float64))
    assert s._warmed_up()
    expected = (history ** 2).mean(-1).sqrt()
    torch.testing.assert_close(s.weights(), expected / expected.sum() * (1 - 0.001) + 0.001 / T, rtol=0, atol=1e-15)


def test_non_finite_losses_are_left_out_of_the_history():
    """A NaN or inf loss (an fp16 overflow: the trainer skips that step) stays out of the history, or every
    weight would turn NaN and the next draw fail; the rest of the batch goes in as without it."""
    T, H = 7, 3
    s = LossSecondMomentResampler(diffusion(T), history_per_term=H)
    g = torch.Generator().manual_seed(3)
    history, counts = torch.zeros(T, H, dtype=torch.float64), torch.zeros(T, dtype=torch.long)
    for size in [30, 5, 50, 200]:
        ts = torch.randint(0, T, (size,), generator=g)
        losses = torch.rand(size, generator=g, dtype=torch.float64)
        losses[::4] = float("nan")
        losses[1::7] = float("inf")
        s.update_with_all_losses(ts, losses)
        keep = torch.isfinite(losses)
        history, counts = _sequential_update(history, counts, ts[keep], losses[keep])
        assert torch.equal(s.state_dict()["history"], history) and torch.equal(s.state_dict()["counts"], counts)
    assert s._warmed_up() and torch.isfinite(s.weights()).all()
    t, w = s.sample(100, generator=g)
    assert torch.isfinite(w).all()


class Linear(torch.nn.Module):
    """A stand-in network with a smooth output, for checking the loops' bookkeeping."""

    def forward(self, x, t):
        return 0.5 * x


def test_progressive_loops_yield_every_step_and_end_at_the_loop_result():
    d = diffusion(12)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    steps = list(d.p_sample_loop_progressive(Linear(), noise.shape, noise=noise,
                                             generator=torch.Generator().manual_seed(1)))
    assert [s["t"] for s in steps] == list(range(11, -1, -1))
    assert all(set(s) == {"sample", "pred_xstart", "t"} for s in steps)
    final = d.p_sample_loop(Linear(), noise.shape, noise=noise, generator=torch.Generator().manual_seed(1))
    assert torch.equal(steps[-1]["sample"], final)
    ddim = list(d.ddim_sample_loop_progressive(Linear(), noise.shape, noise=noise))
    assert len(ddim) == 12 and torch.equal(ddim[-1]["sample"], d.ddim_sample_loop(Linear(), noise.shape, noise=noise))


def test_reverse_ddim_inverts_ddim():
    """Encoding with reverse DDIM then decoding with DDIM returns the start (up to discretisation),
    with the exact score of Gaussian data."""
    from test_diffusion_math import MixtureOracle

    d = diffusion(500)
    oracle = MixtureOracle(d, [(1.0, 0.0, 0.3)])
    x0 = (torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3)
    z = d.ddim_reverse_sample_loop(oracle, x0, clip_denoised=False)
    assert 0.5 < z.std().item() < 1.5  # a noise-like code
    back = d.ddim_sample_loop(oracle, x0.shape, noise=z, clip_denoised=False)
    assert (back - x0).abs().max() < 0.02
    with pytest.raises(ValueError, match="eta must be 0"):
        d.ddim_reverse_sample(Linear(), x0, torch.zeros(2, dtype=torch.long), eta=0.5)
