"""Per-seed determinism, cascades, and the sampling entry points on the tiny presets."""

import pytest
import torch

from conftest import randomize_
from models.adm_compat import diffusion_from_preset
from models.config import build_model
from models.guidance import classifier_cond_fn
from models.presets import get_preset
from models.noise import PerSampleNoise
from models.sampling import draw_labels, sample_cascade, sample_images, upsampler_noise, upsampler_seed


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    preset = get_preset("tiny-32")
    model = randomize_(build_model(preset.config()), seed=1, scale=0.05).eval()
    return model, preset


@pytest.mark.parametrize("use_ddim,respacing", [(False, "6"), (True, "ddim5")])
def test_same_seeds_same_images_at_any_batch_size(tiny, use_ddim, respacing):
    model, preset = tiny
    diffusion = diffusion_from_preset(preset.diffusion, learn_sigma=True, timestep_respacing=respacing)
    seeds = list(range(100, 108))
    full, labels = sample_images(model, diffusion, seeds, 32, num_classes=10, use_ddim=use_ddim, eta=0.5)
    pieces = [sample_images(model, diffusion, seeds[i:i + k], 32, num_classes=10, use_ddim=use_ddim, eta=0.5)
              for i, k in [(0, 1), (1, 3), (4, 4)]]
    torch.testing.assert_close(torch.cat([p[0] for p in pieces]), full, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([p[1] for p in pieces]), labels)
    reordered, _ = sample_images(model, diffusion, seeds[::-1], 32, num_classes=10, use_ddim=use_ddim, eta=0.5)
    torch.testing.assert_close(reordered.flip(0), full, rtol=0, atol=1e-5)
    other, _ = sample_images(model, diffusion, [s + 1000 for s in seeds], 32, num_classes=10, use_ddim=use_ddim)
    assert (other - full).abs().mean() > 0.1


def test_labels_are_a_function_of_the_seed_and_not_sorted():
    a = draw_labels(range(1000), 10)
    assert torch.equal(a[500:510], draw_labels(range(500, 510), 10))
    assert not torch.equal(a, a.sort().values)
    assert set(a.tolist()) == set(range(10))


def test_guidance_scale_zero_changes_nothing(tiny):
    model, preset = tiny
    diffusion = diffusion_from_preset(preset.diffusion, learn_sigma=True, timestep_respacing="4")
    clf = randomize_(build_model(get_preset("tiny-classifier-32").config()), seed=2, scale=0.2).eval()
    seeds = [1, 2, 3]
    plain, _ = sample_images(model, diffusion, seeds, 32, num_classes=10)
    zero, _ = sample_images(model, diffusion, seeds, 32, num_classes=10, cond_fn=classifier_cond_fn(clf, 0.0))
    guided, _ = sample_images(model, diffusion, seeds, 32, num_classes=10, cond_fn=classifier_cond_fn(clf, 100.0))
    assert torch.equal(plain, zero)
    assert (guided - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance needs labels"):
        sample_images(model, diffusion, seeds, 32, cond_fn=classifier_cond_fn(clf, 1.0))


def test_cascade_feeds_the_base_output_and_labels_to_the_upsampler(tiny):
    base, preset = tiny
    up_preset = get_preset("tiny-upsampler-32-64")
    upsampler = randomize_(build_model(up_preset.config()), seed=3, scale=0.05).eval()
    seen = {}

    class Spy(torch.nn.Module):
        num_classes = upsampler.num_classes

        def forward(self, x, t, low_res=None, y=None):
            seen.setdefault("low_res", low_res)
            seen.setdefault("y", y)
            return upsampler(x, t, low_res=low_res, y=y)

    high, low, labels = sample_cascade(
        base, diffusion_from_preset(preset.diffusion, True, "3"), Spy(),
        diffusion_from_preset(up_preset.diffusion, True, "3"), [5, 6], base_size=32, large_size=64, num_classes=10)
    assert high.shape == (2, 3, 64, 64) and low.shape == (2, 3, 32, 32)
    # the upsampler sees the base samples as ADM's super_res_sample.py does: read back from their uint8 npz
    pixels = ((low + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    assert torch.equal(seen["low_res"], torch.from_numpy(pixels.astype("float32") / 127.5 - 1))
    assert not torch.equal(seen["low_res"], low) and torch.equal(seen["y"], labels)
    assert high.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="low-resolution conditioning"):
        upsampler(high, torch.zeros(2, dtype=torch.long), y=labels)


def test_the_upsamplers_noise_is_a_stream_of_its_own():
    """upsampler_seed(s) is splitmix64's first output from state s, cut to 63 bits (from state 0 that output is
    0xE220A8397B1DCDAF, the generator's published first value). Seeding the upsampler's generator with s, as
    the base model's is, would start its noise with the base model's very numbers; this stream shares none."""
    assert upsampler_seed(0) == 0xE220A8397B1DCDAF >> 1
    seeds = [0, 1, 7, 2**62]
    assert len({*seeds, *map(upsampler_seed, seeds)}) == 8 and all(0 <= upsampler_seed(s) < 2**63 for s in seeds)
    base = PerSampleNoise(seeds).randn((4, 3, 8, 8)).flatten(1)
    assert torch.equal(PerSampleNoise(seeds).randn((4, 3, 16, 16)).flatten(1)[:, :192], base)  # the trap
    up = upsampler_noise(seeds).randn((4, 3, 16, 16)).flatten(1)[:, :192]
    for a, b in zip(up, base):  # 192 pairs of independent normals: |r| about 0.07, under 0.3 but 1 in 10^4
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.3
