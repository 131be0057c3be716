"""Our diffusion against guided-diffusion's (PyPI guided-diffusion-sdk), term by term, same weights and noise."""

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_
from models import adm_compat
from models.config import ModelConfig, build_model
from models.guidance import classifier_cond_fn
from models.respace import space_timesteps

gd_script = pytest.importorskip("guided_diffusion.script_util", reason="scripts/setup.sh installs guided-diffusion-sdk")
gd_respace = pytest.importorskip("guided_diffusion.respace")

BASE = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
            num_head_channels=32, resblock_updown=True, class_cond=True, diffusion_steps=40)
VARIANTS = {
    "adm hybrid (learned range, cosine)": dict(learn_sigma=True, noise_schedule="cosine"),
    "fixed large, linear": dict(learn_sigma=False),
    "rescaled kl, respaced": dict(learn_sigma=True, use_kl=True, timestep_respacing="10"),
    "predict x0, rescaled mse, rescaled t": dict(learn_sigma=True, predict_xstart=True, rescale_learned_sigmas=True,
                                                rescale_timesteps=True, timestep_respacing="ddim8"),
}


def pair(variant, seed=0):
    flags = dict(adm_compat.model_and_diffusion_defaults(), **BASE, **VARIANTS[variant])
    ref_model, ref_diff = gd_script.create_model_and_diffusion(**flags)
    randomize_(ref_model, seed=seed, scale=0.05).eval()
    model, diff = adm_compat.create_model_and_diffusion(**flags)
    model.load_state_dict(ref_model.state_dict(), strict=True)
    return model.eval(), diff, ref_model, ref_diff


def close(a, b, tol=1e-5):
    scale = max(b.abs().max().item(), 1e-6)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


def data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randn(n, 3, 32, 32, generator=g),
            torch.randint(0, 1000, (n,), generator=g))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_schedule_arrays_match(variant):
    _, diff, _, ref = pair(variant)
    assert diff.num_timesteps == ref.num_timesteps
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        torch.testing.assert_close(getattr(diff, name), torch.from_numpy(getattr(ref, name)), rtol=1e-12, atol=0)
    if hasattr(ref, "timestep_map"):
        assert diff.timestep_map.tolist() == list(ref.timestep_map)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_losses_match(variant):
    model, diff, ref_model, ref = pair(variant)
    x0, noise, y = data()
    t = torch.tensor([0, diff.num_timesteps // 2, diff.num_timesteps - 1])
    ours = diff.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)
    theirs = ref.training_losses(ref_model, x0, t, model_kwargs={"y": y}, noise=noise)
    assert set(ours) == set(theirs)
    for k in ours:
        close(ours[k], theirs[k])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_p_sample_and_ddim_steps_match(variant):
    model, diff, ref_model, ref = pair(variant)
    x, noise, y = data()
    t = torch.tensor([0, 1, diff.num_timesteps - 1])
    kw = {"y": y}
    for clip in (True, False):
        # the reference draws its own noise: give ours the same draw
        torch.manual_seed(7)
        b = ref.p_sample(ref_model, x, t, clip_denoised=clip, model_kwargs=kw)
        torch.manual_seed(7)
        noise7 = torch.randn_like(x)
        a = diff.p_sample(model, x, t, clip_denoised=clip, model_kwargs=kw, noise=noise7)
        close(a["sample"], b["sample"])
        # pred_xstart = (x - sqrt(1 - abar) eps) / sqrt(abar): at the last step of the 40-step linear schedule
        # that multiplies eps by 487, and with it the two networks' float32 rounding (1e-7, kernel-dependent).
        # The diffusion arithmetic is compared on the same network's output, where nothing is amplified.
        a = diff.p_sample(ref_model, x, t, clip_denoised=clip, model_kwargs=kw, noise=noise7)
        close(a["sample"], b["sample"])
        close(a["pred_xstart"], b["pred_xstart"])
        a = diff.ddim_sample(model, x, t, clip_denoised=clip, model_kwargs=kw)
        b = ref.ddim_sample(ref_model, x, t, clip_denoised=clip, model_kwargs=kw)
        close(a["sample"], b["sample"])
        a = diff.ddim_reverse_sample(model, x, t[:2].repeat(2)[:3], model_kwargs=kw)
        b = ref.ddim_reverse_sample(ref_model, x, t[:2].repeat(2)[:3], model_kwargs=kw)
        close(a["sample"], b["sample"])


def test_sample_loops_match_with_and_without_guidance():
    model, diff, ref_model, ref = pair("rescaled kl, respaced")
    clf = randomize_(build_model(ModelConfig(arch="classifier", image_size=32, model_channels=32, num_res_blocks=1,
                                             channel_mult=[1, 2], attention_resolutions=[16], num_head_channels=32,
                                             num_classes=1000, pool="adaptive")), seed=9, scale=0.05).eval()
    y = torch.tensor([3, 500])
    shape = (2, 3, 32, 32)
    for guide in (None, classifier_cond_fn(clf, 2.0)):
        for loop in ("p_sample_loop", "ddim_sample_loop"):
            torch.manual_seed(11)
            a = getattr(diff, loop)(model, shape, cond_fn=guide, model_kwargs={"y": y})
            torch.manual_seed(11)

            def ref_guide(x, t, y=None):  # the classifier_sample.py formulation
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    logp = F.log_softmax(clf(x_in, t), dim=-1)[range(len(y)), y.view(-1)]
                    return torch.autograd.grad(logp.sum(), x_in)[0] * 2.0
            b = getattr(ref, loop)(ref_model, shape, cond_fn=ref_guide if guide else None, model_kwargs={"y": y})
            close(a, b, tol=1e-4)


def test_calc_bpd_loop_matches():
    model, diff, ref_model, ref = pair("adm hybrid (learned range, cosine)")
    x0 = (torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(2)).float() / 127.5 - 1)
    kw = {"y": torch.tensor([1, 2])}
    torch.manual_seed(5)
    a = diff.calc_bpd_loop(model, x0, model_kwargs=kw)
    torch.manual_seed(5)
    b = ref.calc_bpd_loop(ref_model, x0, model_kwargs=kw)
    close(a["total_bpd"].float(), b["total_bpd"])
    close(a["prior_bpd"].float(), b["prior_bpd"])
    # our column t is timestep t; guided-diffusion stacks them from T-1 down to 0
    close(a["vb"].float(), b["vb"].flip(1))
    close(a["xstart_mse"].float(), b["xstart_mse"].flip(1), tol=1e-4)
    close(a["mse"].float(), b["mse"].flip(1), tol=1e-4)


@pytest.mark.parametrize("T,spec", [(1000, "ddim25"), (1000, "ddim50"), (1000, "250"), (1000, "90,60,60,20,20"),
                                    (1000, "10,3"), (4000, "100"), (40, "7,3,1"), (1000, ""),
                                    (1000, "3,0,3")])  # (a section of 0 steps: skipped, as ADM does)
def test_space_timesteps_match(T, spec):
    expected = gd_respace.space_timesteps(T, spec) if spec else set(range(T))
    assert space_timesteps(T, spec) == expected
