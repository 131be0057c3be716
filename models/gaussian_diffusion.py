"""The Gaussian diffusion process of DDPM / improved DDPM / ADM, with guided-diffusion's method names.

Code timestep t = 0..T-1 is the paper's step t+1 (t = 0 is the x_1 -> x_0 decoder step). Schedule
arrays are float64 on the CPU; each device gets float32 copies once (float64 for float64 inputs),
so a sampling step does no host work and no host-device transfer for the schedule.

Stochastic methods take `noise` (an explicit tensor) or `generator`: a torch.Generator, or a
PerSampleNoise whose draws for sample i depend on seed i only (see models/noise.py).
"""

import enum
import math

import torch

from .distributions import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .noise import randn_for


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()  # the network predicts x_{t-1}'s mean
    START_X = enum.auto()  # the network predicts x_0
    EPSILON = enum.auto()  # the network predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # second half of the output is log Sigma
    FIXED_SMALL = enum.auto()  # Sigma = posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # Sigma = beta_t (beta~_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # log Sigma interpolates log beta_t and log beta~_t (ADM)


class LossType(enum.Enum):
    MSE = enum.auto()  # L_simple, plus the VLB term for a learned variance (hybrid)
    RESCALED_MSE = enum.auto()  # as MSE, VLB term scaled by T/1000 (lambda = 0.001 at any T)
    KL = enum.auto()  # the one-step VLB term only
    RESCALED_KL = enum.auto()  # KL x T

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


_TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
           "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
           "posterior_mean_coef1", "posterior_mean_coef2", "log_betas", "fixed_large_variance",
           "fixed_large_log_variance")


class GaussianDiffusion:
    """q(x_t | x_0), the reverse process p(x_{t-1} | x_t) a network parameterises, losses and samplers."""

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType, rescale_timesteps: bool = False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        b = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if b.ndim != 1 or len(b) == 0 or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("betas must be a 1-D array with every entry in (0, 1]")
        self.betas = b
        self.num_timesteps = len(b)
        alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        one = torch.ones(1, dtype=torch.float64)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], torch.zeros(1, dtype=torch.float64)])
        ac = self.alphas_cumprod
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1).sqrt()
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - ac)
        # log of beta~ with its 0 at t = 0 replaced by beta~_1 ("clipped")
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if len(pv) > 1 else torch.log(b)
        self.posterior_mean_coef1 = b * self.alphas_cumprod_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - ac)
        self.log_betas = torch.log(b)
        # FIXED_LARGE: beta_t, with beta~_1 at t = 0 for a better decoder likelihood
        self.fixed_large_variance = torch.cat([pv[1:2], b[1:]]) if len(b) > 1 else b.clone()
        self.fixed_large_log_variance = torch.log(self.fixed_large_variance)
        self._device_tables: dict = {}

    # ----- schedule lookup -----------------------------------------------------------------------

    def _tables(self, device: torch.device, dtype: torch.dtype) -> dict:
        key = (device, dtype)
        if key not in self._device_tables:
            self._device_tables[key] = {name: getattr(self, name).to(device=device, dtype=dtype) for name in _TABLES}
        return self._device_tables[key]

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] broadcast to like's shape: (N,) -> (N, 1, 1, 1); float32 unless like is float64."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        out = self._tables(like.device, dtype)[name][t]
        return out.view(-1, *([1] * (like.ndim - 1)))

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if t.shape != (batch,):
            raise ValueError(f"timesteps t must have shape ({batch},), got {tuple(t.shape)}")
        if t.dtype.is_floating_point:
            raise ValueError(f"timesteps t must be integer indices, got {t.dtype}")
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {int(t.min())}..{int(t.max())}")

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() * (1000.0 / self.num_timesteps) if self.rescale_timesteps else t

    # ----- forward process -----------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("alphas_cumprod", t, x_start).neg().add(1.0).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None, generator=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = randn_for(x_start, generator)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ in shape")
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        var = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    # ----- reverse process -----------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the network: the mean, variance, log-variance of p(x_{t-1} | x_t) and the predicted x_0."""
        model_kwargs = model_kwargs or {}
        b, c = x.shape[:2]
        self._check_t(t, b)
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"a learned variance needs {2 * c} output channels, the model gave "
                                 f"{model_output.shape[1]} (is learn_sigma set on the model?)")
            model_output, var_values = torch.split(model_output.to(x.dtype), c, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x)
                max_log = self._extract("log_betas", t, x)
                frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if model_output.shape[1] != c:
                raise ValueError(f"a fixed variance needs {c} output channels, the model gave {model_output.shape[1]}")
            model_output = model_output.to(x.dtype)
            name = "fixed_large" if self.model_var_type == ModelVarType.FIXED_LARGE else None
            if name:
                model_variance = self._extract("fixed_large_variance", t, x).expand_as(x)
                model_log_variance = self._extract("fixed_large_log_variance", t, x).expand_as(x)
            else:
                model_variance = self._extract("posterior_variance", t, x).expand_as(x)
                model_log_variance = self._extract("posterior_log_variance_clipped", t, x).expand_as(x)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return ((xprev - self._extract("posterior_mean_coef2", t, x_t) * x_t)
                / self._extract("posterior_mean_coef1", t, x_t))

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    # ----- guidance ------------------------------------------------------------------------------

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Ancestral guidance: mu + Sigma * grad log p(y | x_t) (Algorithm 1), gradient in float32."""
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """DDIM guidance: eps' = eps - sqrt(1 - abar_t) grad log p(y | x_t) (Algorithm 2)."""
        alpha_bar = self._extract("alphas_cumprod", t, x)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    # ----- ancestral sampling --------------------------------------------------------------------

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                 noise=None, generator=None):
        """One step x_t -> x_{t-1}; no noise is added where t == 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = randn_for(x, generator)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        mean = out["mean"]
        if cond_fn is not None:
            mean = self.condition_mean(cond_fn, out, x, t, model_kwargs)
        sample = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, generator=None, known=None, resample=1):
        """Sample from the model: x_T ~ N(0, I) (or `noise`) down to x_0. Returns the final sample."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                                                    model_kwargs, device, progress, generator, known, resample):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False, generator=None,
                                  known=None, resample=1):
        """Yield {"sample", "pred_xstart", "t"} after every step (DDPM's progressive decoding).

        known=(mask, x0): impose known pixels (mask 1) at every step by drawing them from q(x_t | x0),
        the 2015 paper's conditioning; the final sample equals x0 where the mask is 1. resample=U > 1
        re-noises and re-denoises each step U times (RePaint), which lets the unknown region agree
        with the known one much better, at U times the cost.
        """
        yield from self._loop(lambda x, t: self.p_sample(model, x, t, clip_denoised, denoised_fn, cond_fn,
                                                         model_kwargs, generator=generator),
                              model, shape, noise, device, progress, generator, known, resample)

    def _loop(self, step, model, shape, noise, device, progress, generator, known, resample=1):
        if device is None:
            if noise is not None:
                device = noise.device
            elif isinstance(model, torch.nn.Module):
                device = next(model.parameters()).device
            else:
                device = torch.device("cpu")
        img = noise if noise is not None else randn_for(torch.empty(shape, device=device), generator)
        if tuple(img.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(img.shape)} differs from the requested shape {tuple(shape)}")
        if resample < 1:
            raise ValueError(f"resample must be >= 1, got {resample}")
        mask = x0 = None
        if known is not None:
            mask, x0 = known
            if x0.shape != img.shape:
                raise ValueError(f"known image shape {tuple(x0.shape)} differs from the sample shape {tuple(img.shape)}")
            try:
                mask = torch.as_tensor(mask, device=img.device).to(img.dtype).expand(img.shape)
            except RuntimeError:
                raise ValueError(f"mask shape {tuple(torch.as_tensor(mask).shape)} does not broadcast to the sample "
                                 f"shape {tuple(img.shape)}") from None
            x0 = x0.to(img)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices, desc="sampling", leave=False)
        all_t = torch.arange(self.num_timesteps, device=img.device)
        with torch.no_grad():
            if mask is not None:
                img = self._impose(img, mask, x0, all_t[-1], generator)
            for i in indices:
                t = all_t[i].expand(shape[0])
                for r in range(resample if mask is not None and i > 0 else 1):
                    if r:  # RePaint-style: diffuse x_{t-1} back to x_t and denoise again
                        beta = self._extract("betas", t, img)
                        img = (1 - beta).sqrt() * img + beta.sqrt() * randn_for(img, generator)
                    out = step(img, t)
                    img = out["sample"]
                    if mask is not None:
                        img = self._impose(img, mask, x0, all_t[i - 1], generator) if i > 0 else torch.lerp(img, x0, mask)
                yield {**out, "sample": img, "t": i}

    def _impose(self, x, mask, x0, t, generator):
        xt = self.q_sample(x0, t.expand(x.shape[0]), noise=randn_for(x0, generator))
        return torch.lerp(x, xt, mask)

    # ----- DDIM ----------------------------------------------------------------------------------

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, noise=None, generator=None):
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt() * (1 - alpha_bar / alpha_bar_prev).sqrt()
        mean_pred = out["pred_xstart"] * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev - sigma ** 2).sqrt() * eps
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if eta:
            if noise is None:
                noise = randn_for(x, generator)
            mean_pred = mean_pred + nonzero * sigma * noise
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """Deterministic encoding step x_t -> x_{t+1} (ODE direction); eta must be 0."""
        if eta != 0.0:
            raise ValueError("reverse DDIM is deterministic: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = ((self._extract("sqrt_recip_alphas_cumprod", t, x) * x - out["pred_xstart"])
               / self._extract("sqrt_recipm1_alphas_cumprod", t, x))
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x)
        sample = out["pred_xstart"] * alpha_bar_next.sqrt() + (1 - alpha_bar_next).sqrt() * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample_loop(self, model, x0, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                                 steps=None):
        """Encode x0 into noise by running reverse DDIM over the first `steps` steps (default all)."""
        x = x0
        with torch.no_grad():
            for i in range(self.num_timesteps if steps is None else steps):
                t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
                x = self.ddim_reverse_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs)["sample"]
        return x

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, generator=None, known=None):
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                                                       model_kwargs, device, progress, eta, generator, known):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0,
                                     generator=None, known=None):
        yield from self._loop(lambda x, t: self.ddim_sample(model, x, t, clip_denoised, denoised_fn, cond_fn,
                                                            model_kwargs, eta, generator=generator),
                              model, shape, noise, device, progress, generator, known)

    # ----- likelihood and losses -----------------------------------------------------------------

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The one-step VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the discretised decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, generator=None):
        """Per-sample loss terms: "loss", and "mse" / "vb" where they apply."""
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = randn_for(x_start, generator)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms
        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            c = x_t.shape[1]
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"a learned variance needs {2 * c} output channels, the model gave "
                                 f"{model_output.shape[1]} (is learn_sigma set on the model?)")
            model_output, var_values = torch.split(model_output, c, dim=1)
            # the VLB term trains only the variance: the mean part is detached
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *a, **k: frozen, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = {ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
                  ModelMeanType.START_X: lambda: x_start,
                  ModelMeanType.EPSILON: lambda: noise}[self.model_mean_type]()
        terms["mse"] = mean_flat((target - model_output.to(target.dtype)) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim: the prior term L_T (nearly 0 for a good schedule)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, timesteps=None, generator=None,
                      progress=False):
        """Negative log-likelihood bound in bits/dim, per sample, with its per-timestep terms.

        Returns total_bpd, prior_bpd, vb (N, T), xstart_mse (N, T), mse (N, T); column t is timestep t
        (guided-diffusion stacks them from T-1 down).

        timesteps=K (an int) gives a fast, unbiased *estimate* of the same bound from K + 1 network
        evaluations instead of T: the decoder term L_0 exactly, and steps 1..T-1 cut into K strata of
        geometrically growing width (the terms fall steeply with t); each sample draws one random step
        per stratum, which stands for its whole stratum. Then vb / xstart_mse / mse are (N, columns), one
        column per stratum, with `strata` = [(first step, width), ...]: K + 1 of them, or fewer where the
        rounded edges of small strata coincide (T=1000, K=50: 43).
        """
        n, T = x_start.shape[0], self.num_timesteps
        if timesteps is None:
            strata = [(t, 1) for t in range(T)]
        else:
            k = int(timesteps)
            if not 1 <= k <= T - 1:
                raise ValueError(f"timesteps (strata for the estimate) must lie in 1..{T - 1}, got {timesteps}")
            edges = sorted({1, T} | {int(round(T ** (j / k))) for j in range(1, k)})
            strata = [(0, 1)] + [(a, b - a) for a, b in zip(edges[:-1], edges[1:])]
        dev = x_start.device
        cols = len(strata)
        vb = torch.zeros((n, cols), device=dev, dtype=torch.float64)
        xstart_mse, mse = vb.clone(), vb.clone()
        order = range(cols - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            order = tqdm(order, desc="bits/dim", leave=False)
        gen = generator if isinstance(generator, torch.Generator) else None
        with torch.no_grad():
            for j in order:
                start, width = strata[j]
                t = torch.full((n,), start, dtype=torch.long)
                if width > 1 and hasattr(generator, "randint"):  # per-sample noise: each sample's own generator
                    t = t + generator.randint(width).cpu()
                elif width > 1:
                    t = t + torch.randint(width, (n,), generator=gen, device=gen.device if gen else "cpu").cpu()
                t = t.to(dev)
                noise = randn_for(x_start, generator)
                x_t = self.q_sample(x_start, t, noise=noise)
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
                vb[:, j] = out["output"].double() * width
                xstart_mse[:, j] = mean_flat((out["pred_xstart"] - x_start) ** 2).double()
                eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
                mse[:, j] = mean_flat((eps - noise) ** 2).double()
        prior = self._prior_bpd(x_start).double()
        result = {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse,
                  "mse": mse}
        if timesteps is not None:
            result["vb"] = vb  # already weighted by stratum width
            result["strata"] = strata
        return result
