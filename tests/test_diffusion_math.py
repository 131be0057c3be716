"""Closed-form checks in float64 and oracle-model experiments for the diffusion process."""

import math

import pytest
import torch

from models import gaussian_diffusion as gd
from models.distributions import discretized_gaussian_log_likelihood, normal_kl
from models.respace import SpacedDiffusion, space_timesteps
from models.schedules import cosine_betas, get_named_beta_schedule, linear_betas

F64 = torch.float64


def make(T=1000, schedule="linear", var=gd.ModelVarType.FIXED_SMALL, mean=gd.ModelMeanType.EPSILON, spaced=None):
    kw = dict(betas=get_named_beta_schedule(schedule, T), model_mean_type=mean, model_var_type=var,
              loss_type=gd.LossType.MSE)
    if spaced is not None:
        return SpacedDiffusion(use_timesteps=space_timesteps(T, spaced), **kw)
    return gd.GaussianDiffusion(**kw)


# ----- schedules and closed forms ---------------------------------------------------------------

def test_linear_and_cosine_schedules():
    b = linear_betas(1000)
    assert b.dtype == F64 and b[0].item() == pytest.approx(1e-4, abs=1e-15) and b[-1].item() == pytest.approx(0.02)
    assert linear_betas(4000)[-1].item() == pytest.approx(0.005)  # scaled by 1000/T
    # below T = 20 its last beta passes 1: said as the schedule's limit (it was "betas must be in (0, 1]")
    assert linear_betas(20)[-1].item() == pytest.approx(1.0)
    for steps in (19, 10):
        with pytest.raises(ValueError, match=f"the linear schedule needs at least 20 steps, got {steps}"):
            linear_betas(steps)
    c = cosine_betas(1000)
    abar = torch.cumprod(1 - c, 0)
    f = lambda tau: math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (0, 10, 500, 900):
        assert abar[i].item() == pytest.approx(f((i + 1) / 1000) / f(0), rel=1e-10)
    assert c.max().item() == pytest.approx(0.999)  # capped
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        get_named_beta_schedule("quadratic", 10)
    custom = get_named_beta_schedule([0.1, 0.2, 0.3])  # a per-step array, as the 2015 paper allows
    assert custom.tolist() == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="every entry in"):
        get_named_beta_schedule([0.1, 1.5])


def test_q_sample_and_q_mean_variance_closed_form():
    d = make(100, "cosine")
    x0 = torch.randn(4, 3, 2, 2, dtype=F64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 5, 50, 99])
    abar = torch.cumprod(1 - d.betas, 0)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise=eps), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    mean, var, logvar = d.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, abar.sqrt() * x0)
    torch.testing.assert_close(var, (1 - abar).expand_as(x0))
    # moments over many draws
    x0 = torch.full((200000, 1, 1, 1), 0.7, dtype=F64)
    t = torch.full((200000,), 30)
    xt = d.q_sample(x0, t, generator=torch.Generator().manual_seed(0))
    a = torch.cumprod(1 - d.betas, 0)[30]
    assert xt.mean().item() == pytest.approx(0.7 * a.sqrt().item(), abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - a.item(), rel=1e-2)


def test_posterior_matches_bayes_rule():
    d = make(50, "linear")
    x0 = torch.randn(3, 1, 2, 2, dtype=F64)
    xt = torch.randn(3, 1, 2, 2, dtype=F64)
    for step in (1, 7, 49):
        t = torch.full((3,), step)
        beta = d.betas[step]
        abar_prev = torch.cumprod(1 - d.betas, 0)[step - 1]
        # q(x_{t-1}|x0) = N(sqrt(abar_prev) x0, 1 - abar_prev); q(x_t|x_{t-1}) = N(sqrt(1-beta) x_{t-1}, beta)
        precision = (1 - beta) / beta + 1 / (1 - abar_prev)
        var = 1 / precision
        mean = var * ((1 - beta).sqrt() * xt / beta + abar_prev.sqrt() * x0 / (1 - abar_prev))
        m, v, logv = d.q_posterior_mean_variance(x0, xt, t)
        torch.testing.assert_close(m, mean)
        torch.testing.assert_close(v, var.expand_as(xt))
        torch.testing.assert_close(logv, var.log().expand_as(xt))


def test_gaussian_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=F64), torch.randn(100, generator=g, dtype=F64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=F64), torch.randn(100, generator=g, dtype=F64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.9, -2.0), (-0.95, -5.0), (0.3, 0.5)])
def test_discretized_decoder_sums_to_one(mean, log_scale):
    x = torch.arange(256, dtype=F64) / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_space_timesteps_values_and_errors():
    assert sorted(space_timesteps(1000, "ddim25")) == list(range(0, 1000, 40))
    s = sorted(space_timesteps(1000, "250"))
    assert len(s) == 250 and s[0] == 0 and s[-1] == 999
    assert sorted(space_timesteps(10, "5,2")) == [0, 1, 2, 3, 4, 5, 9]
    for bad, match in [("ddim999", "no integer stride"), ("abc", "expected 'ddimN'"), ("ddimx", "ddimN"),
                       ("20", "cannot take 20"), ("0", "positive"), ("3,-1", "0 or more")]:
        with pytest.raises(ValueError, match=match):
            space_timesteps(1000 if bad.startswith("ddim") else 10, bad)


def test_bad_timesteps_and_shapes():
    d = make(100)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 99\]"):
        d.q_sample(x, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="integer indices"):
        d.q_sample(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        d.q_sample(x, torch.tensor([1]))
    with pytest.raises(ValueError, match="known image shape"):
        d.p_sample_loop(lambda x, t: x, (2, 3, 4, 4), known=(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 8, 8)))
    with pytest.raises(ValueError, match="mask shape"):
        d.p_sample_loop(lambda x, t: x, (2, 3, 4, 4), known=(torch.ones(3, 3, 4, 4), torch.zeros(2, 3, 4, 4)))
    with pytest.raises(ValueError, match="fixed variance needs 3 output channels"):
        d.p_sample(lambda x, t: torch.cat([x, x], 1), x, torch.tensor([1, 2]))


# ----- oracle models ----------------------------------------------------------------------------

class MixtureOracle(torch.nn.Module):
    """The exact E[eps | x_t] for data whose every dimension is a mixture of Gaussians
    [(weight, mean, std), ...]; with learned=True also the exact variance of the true reverse step
    q(x_{t-1} | x_t) (= beta~_t + c1_t^2 Var(x0 | x_t)), i.e. the best Gaussian reverse kernel."""

    def __init__(self, diffusion, components, learned=False):
        super().__init__()
        self.abar = torch.cumprod(1 - diffusion.betas, 0)
        self.d, self.components, self.learned = diffusion, components, learned
        # a respaced process hands the network original indices: map them back to its own steps
        kept = getattr(diffusion, "timestep_map", torch.arange(diffusion.num_timesteps))
        self.index = torch.full((int(kept.max()) + 1,), -1, dtype=torch.long).index_copy(
            0, kept, torch.arange(len(kept)))

    def forward(self, x, t, **_):
        t = self.index[t]
        a = self.abar[t].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        logw, means, variances = [], [], []
        for w, m, s in self.components:
            var_t = a * s ** 2 + 1 - a
            logw.append(math.log(w) - (x - a.sqrt() * m) ** 2 / (2 * var_t) - 0.5 * var_t.log())
            means.append(m + s ** 2 * a.sqrt() * (x - a.sqrt() * m) / var_t)  # E[x0 | x_t, k]
            variances.append(s ** 2 * (1 - a) / var_t)  # Var(x0 | x_t, k)
        r = torch.softmax(torch.stack(logw), dim=0)
        ex = sum(r[k] * means[k] for k in range(len(means)))
        vx = sum(r[k] * (variances[k] + means[k] ** 2) for k in range(len(means))) - ex ** 2
        eps = (x - a.sqrt() * ex) / (1 - a).sqrt()
        if not self.learned:
            return eps
        c1 = self.d.posterior_mean_coef1[t].view_as(a).to(x.dtype)
        post = self.d.posterior_variance[t].view_as(a).to(x.dtype)
        return torch.cat([eps, torch.log(post + c1 ** 2 * vx.clamp_min(0))], dim=1)


def discretised_mixture(components):
    """Probabilities of the 256 levels of 8-bit data under a Gaussian mixture (edge bins open)."""
    levels = torch.arange(256, dtype=F64) / 127.5 - 1
    edges = torch.cat([torch.tensor([-math.inf], dtype=F64), (levels[:-1] + levels[1:]) / 2,
                       torch.tensor([math.inf], dtype=F64)])
    p = torch.zeros(256, dtype=F64)
    for w, m, s in components:
        normal = torch.distributions.Normal(torch.tensor(m, dtype=F64), torch.tensor(s, dtype=F64))
        p += w * (normal.cdf(edges[1:]) - normal.cdf(edges[:-1]))
    return levels, p


def test_oracle_ancestral_sampling_is_exact_for_gaussian_data():
    """With Gaussian data the best Gaussian reverse kernel is the true one: 25 steps sample exactly
    (up to the noise-free last step, which with beta_0 = 1e-4 removes a negligible Var(x0 | x_1))."""
    mu, s = 0.3, 0.2
    d = make(1000, "linear", var=gd.ModelVarType.LEARNED, spaced="25")
    shape = (20000, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    x = d.p_sample_loop(MixtureOracle(d, [(1.0, mu, s)], learned=True), shape,
                        noise=torch.randn(shape, generator=g, dtype=F64), clip_denoised=False, generator=g)
    assert x.mean().item() == pytest.approx(mu, abs=0.005)
    assert x.std().item() == pytest.approx(s, rel=0.02)


def test_oracle_ddim_recovers_data_moments():
    mu, s = 0.3, 0.2
    d = make(1000, "linear")
    shape = (4000, 1, 1, 4)
    g = torch.Generator().manual_seed(0)
    x = d.ddim_sample_loop(MixtureOracle(d, [(1.0, mu, s)]), shape, noise=torch.randn(shape, generator=g, dtype=F64),
                           clip_denoised=False)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.03)


def test_bpd_converges_to_true_nll_as_steps_grow():
    """The 2015 paper's claim: with the best Gaussian reverse kernels the bound on non-Gaussian data
    tightens as T grows and reaches the data's true negative log-likelihood."""
    components = [(0.5, -0.4, 0.08), (0.5, 0.4, 0.08)]
    levels, p = discretised_mixture(components)
    g = torch.Generator().manual_seed(1)
    idx = torch.multinomial(p, 3000, replacement=True, generator=g)
    x0 = levels[idx].view(-1, 1, 1, 1)
    nll = -(p[idx].log2()).mean().item()  # exact NLL (bits/dim) of these very samples
    bpd = {}
    for T in (5, 20, 1000):
        d = make(T, "cosine", var=gd.ModelVarType.LEARNED)
        out = d.calc_bpd_loop(MixtureOracle(d, components, learned=True), x0, clip_denoised=False,
                              generator=torch.Generator().manual_seed(9))
        assert out["vb"].shape == (3000, T) and out["prior_bpd"].max() < 1e-3
        bpd[T] = out["total_bpd"].mean().item()
    assert bpd[5] > bpd[20] > bpd[1000]
    assert bpd[5] - nll > 0.5  # few steps: a loose bound
    assert bpd[1000] == pytest.approx(nll, abs=0.03)

    # the fast estimate: 24 evaluations instead of 1000, unbiased, within a few percent
    d = make(1000, "cosine", var=gd.ModelVarType.LEARNED)
    fast = d.calc_bpd_loop(MixtureOracle(d, components, learned=True), x0, clip_denoised=False, timesteps=24,
                           generator=torch.Generator().manual_seed(3))
    assert fast["vb"].shape == (3000, len(fast["strata"])) and sum(w for _, w in fast["strata"]) == 1000
    assert fast["total_bpd"].mean().item() == pytest.approx(bpd[1000], rel=0.03)
    # per-sample noise decides the strata's steps too (they came from torch's global RNG): the same seeds,
    # the same estimate, whatever ran before
    from models.noise import PerSampleNoise

    x8 = x0[:8]
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs))  # the global RNG differs between the runs
        runs.append(d.calc_bpd_loop(MixtureOracle(d, components, learned=True), x8, clip_denoised=False,
                                    timesteps=24, generator=PerSampleNoise(range(8)))["total_bpd"])
    assert torch.equal(runs[0], runs[1])


def test_full_respacing_equals_the_base_process():
    base, spaced = make(50, "cosine"), make(50, "cosine", spaced="")
    model = MixtureOracle(base, [(1.0, 0.2, 0.3)])
    noise = torch.randn(16, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    a = base.p_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(4))
    b = spaced.p_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_guidance_with_analytic_classifier_picks_the_class():
    """Data: two classes at -0.5 and +0.5 (s = 0.1). An oracle for the unconditional mixture plus the
    exact noisy classifier p(y | x_t) steers samples to the requested class."""
    from models.guidance import classifier_cond_fn

    d = make(1000, "linear", spaced="50")
    base = make(1000, "linear")
    abar = torch.cumprod(1 - base.betas, 0)
    centers, s = torch.tensor([-0.5, 0.5], dtype=F64), 0.1

    def log_lik(x, t):  # (N, 2): log N(x_t; sqrt(abar) c_k, abar s^2 + 1 - abar), summed over dims
        a = abar[t].view(-1, 1)
        flat = x.flatten(1)
        var = a * s ** 2 + 1 - a
        return torch.stack([(-(flat - a.sqrt() * c) ** 2 / (2 * var) - 0.5 * var.log()).sum(1) for c in centers], 1)

    class Mixture(torch.nn.Module):
        def forward(self, x, t, y=None):  # unconditional: ignores the label the classifier gets
            a = abar[t].view(-1, 1, 1, 1)
            resp = torch.softmax(log_lik(x, t), dim=1)  # p(k | x_t)
            var = a * s ** 2 + 1 - a
            eps = sum(resp[:, k].view(-1, 1, 1, 1) * (1 - a).sqrt() * (x - a.sqrt() * centers[k]) / var
                      for k in range(2))
            return eps

    class Classifier(torch.nn.Module):
        def forward(self, x, t):
            return log_lik(x, t)

    n = 400
    y = torch.tensor([0, 1]).repeat(n // 2)
    shape = (n, 1, 1, 2)
    noise = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    hits = {}
    for scale in (0.0, 1.0):
        x = d.p_sample_loop(Mixture(), shape, noise=noise, cond_fn=classifier_cond_fn(Classifier(), scale),
                            model_kwargs={"y": y}, clip_denoised=False, generator=torch.Generator().manual_seed(6))
        hits[scale] = ((x.flatten(1).mean(1) > 0).long() == y).double().mean().item()
    assert hits[0.0] == pytest.approx(0.5, abs=0.1)  # unguided: classes at random
    assert hits[1.0] > 0.97
    with pytest.raises(ValueError, match="needs the target labels"):
        d.p_sample(Mixture(), noise, torch.zeros(n, dtype=torch.long), cond_fn=classifier_cond_fn(Classifier(), 1.0))


def test_inpainting_matches_the_gaussian_conditional():
    """x = (x_a, x_b) jointly Gaussian, correlation rho: x_b | x_a = N(rho x_a, s^2 (1 - rho^2)).
    Plain replacement (the 2015 paper's) under-uses the correlation; with RePaint resampling it matches."""
    d = make(1000, "linear", spaced="250")
    abar = torch.cumprod(1 - make(1000, "linear").betas, 0)
    s, rho = 0.3, 0.8
    cov = s ** 2 * torch.tensor([[1.0, rho], [rho, 1.0]], dtype=F64)

    class Correlated(torch.nn.Module):
        def forward(self, x, t):  # x: (N, 1, 1, 2); E[eps | x_t] = sqrt(1-a) Sigma_t^-1 x_t
            a = abar[t].view(-1, 1, 1)
            sigma_t = a * cov + (1 - a) * torch.eye(2, dtype=F64)
            return ((1 - a).sqrt() * torch.linalg.solve(sigma_t, x.view(-1, 2, 1))).view_as(x)

    n = 3000
    known = torch.zeros(n, 1, 1, 2, dtype=F64)
    known[..., 0] = 0.3
    mask = torch.tensor([1.0, 0.0], dtype=F64).view(1, 1, 1, 2)
    errors = {}
    for resample in (1, 10):
        g = torch.Generator().manual_seed(7)
        x = d.p_sample_loop(Correlated(), known.shape, noise=torch.randn(known.shape, dtype=F64, generator=g),
                            clip_denoised=False, generator=g, known=(mask, known), resample=resample)
        assert torch.equal(x[..., 0], known[..., 0])  # known pixels reproduced exactly
        b = x[..., 1].flatten()
        errors[resample] = abs(b.mean().item() - rho * 0.3)
    assert b.mean().item() == pytest.approx(rho * 0.3, abs=0.03)
    assert b.std().item() == pytest.approx(s * math.sqrt(1 - rho ** 2), rel=0.15)
    assert errors[1] > 2 * errors[10]  # plain replacement is biased toward the unconditional mean
