"""Shape, dtype and conditioning contracts; checkpointing; memory formats; clear errors on bad input."""

import pytest
import torch

from conftest import randomize_
from models.attention import AttentionBlock
from models.blocks import ResBlock
from models.config import ModelConfig, build_model
from models.presets import get_preset


def tiny(**kw):
    base = dict(arch="unet", image_size=32, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
                attention_resolutions=[16], num_head_channels=32, resblock_updown=True, num_classes=10)
    return ModelConfig(**{**base, **kw})


def batch(n=2, size=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, classes, (n,), generator=g))


@pytest.mark.parametrize("learn_sigma,channels", [(False, 3), (True, 6)])
def test_learn_sigma_output_channels(learn_sigma, channels):
    model = randomize_(build_model(tiny(learn_sigma=learn_sigma)))
    x, t, y = batch()
    out = model(x, t, y)
    assert out.shape == (2, channels, 32, 32) and out.dtype == torch.float32


def test_fresh_model_is_zero_initialised_where_adm_says():
    torch.manual_seed(0)
    model = build_model(tiny(learn_sigma=True))
    x, t, y = batch()
    assert torch.count_nonzero(model(x, t, y)) == 0  # zero output conv
    blk = ResBlock(32, 64, use_scale_shift_norm=True)
    h = torch.randn(2, 32, 8, 8)
    assert torch.equal(blk(h, torch.randn(2, 64)), h)  # residual branch starts at zero
    attn = AttentionBlock(32, num_head_channels=32)
    assert torch.equal(attn(h), h)


def test_class_conditional_needs_labels_and_unconditional_rejects_them():
    x, t, y = batch()
    cond = build_model(tiny())
    with pytest.raises(ValueError, match="class-conditional .*pass labels y"):
        cond(x, t)
    uncond = build_model(tiny(num_classes=None))
    with pytest.raises(ValueError, match="unconditional .* labels y were passed"):
        uncond(x, t, y)


@pytest.mark.parametrize("labels,match", [([0, 10], r"labels must lie in \[0, 9\]"),
                                          ([-1, 3], r"labels must lie in \[0, 9\]"),
                                          ([0.0, 1.0], "integer class indices"),
                                          ([1, 2, 3], r"shape \(2,\)")])
def test_bad_labels_get_clear_errors(labels, match):
    x, t, _ = batch()
    with pytest.raises(ValueError, match=match):
        build_model(tiny())(x, t, torch.tensor(labels))


def test_wrong_image_size_and_timesteps():
    model = build_model(tiny())
    x, t, y = batch(size=64)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, 32, 32\), got \(2, 3, 64, 64\)"):
        model(x, t, y)
    x, t, y = batch()
    with pytest.raises(ValueError, match="timesteps must have shape"):
        model(x, t[:1], y)
    clf = build_model(get_preset("tiny-classifier-32").config())
    with pytest.raises(ValueError, match="expected input of shape"):
        clf(torch.randn(1, 3, 16, 16), torch.zeros(1))


def test_upsampler_conditioning_errors():
    up = build_model(get_preset("tiny-upsampler-32-64").config())
    x, t, y = batch(size=64)
    with pytest.raises(ValueError, match="low-resolution conditioning"):
        up(x, t, y=y)
    with pytest.raises(ValueError, match="built for 32x32"):
        up(x, t, low_res=torch.randn(2, 3, 16, 16), y=y)
    assert up(x, t, low_res=torch.randn(2, 3, 32, 32), y=y).shape == (2, 6, 64, 64)
    patch, low = torch.randn(2, 3, 24, 24), torch.randn(2, 3, 12, 12)  # what a trainer with patch_size=24 feeds
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, 64, 64\), got \(2, 3, 24, 24\)"):
        up(patch, t, low_res=low, y=y)
    up.patch_size = 24
    assert up(patch, t, low_res=low, y=y).shape == (2, 6, 24, 24)
    assert up(x, t, low_res=torch.randn(2, 3, 32, 32), y=y).shape == (2, 6, 64, 64)  # and whole images still
    with pytest.raises(ValueError, match="built for 32x32 low-resolution inputs, got .16, 16. for a 24x24 patch, want 12x12"):
        up(patch, t, low_res=torch.randn(2, 3, 16, 16), y=y)
    with pytest.raises(ValueError, match=r"\(or 24x24 patches\), got \(2, 3, 32, 32\)"):
        up(torch.randn(2, 3, 32, 32), t, low_res=low, y=y)


def count_calls(module_type, model):
    calls = {"n": 0}
    for m in model.modules():
        if isinstance(m, module_type):
            inner = m._forward

            def wrapped(*a, _inner=inner, **k):
                calls["n"] += 1
                return _inner(*a, **k)
            m._forward = wrapped
    return calls


def test_gradient_checkpointing_same_grads_and_covers_attention():
    x, t, y = batch()
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = randomize_(build_model(tiny(use_checkpoint=ckpt)), seed=4)
        attn_calls = count_calls(AttentionBlock, model)
        res_calls = count_calls(ResBlock, model)
        model(x, t, y).square().mean().backward()
        n_attn = sum(isinstance(m, AttentionBlock) for m in model.modules())
        n_res = sum(isinstance(m, ResBlock) for m in model.modules())
        factor = 2 if ckpt else 1  # checkpointed blocks run their forward again during backward
        assert attn_calls["n"] == factor * n_attn and res_calls["n"] == factor * n_res
        grads[ckpt] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_channels_last_gives_same_outputs():
    model = randomize_(build_model(tiny(learn_sigma=True))).eval()
    x, t, y = batch()
    with torch.no_grad():
        ref = model(x, t, y)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_bf16_autocast_and_fp16_trunk():
    model = randomize_(build_model(tiny(learn_sigma=True)), scale=0.05).eval()
    x, t, y = batch()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    half = randomize_(build_model(tiny(learn_sigma=True, use_fp16=True)), scale=0.05).eval()
    assert half.input_blocks[0][0].weight.dtype == torch.float16
    assert half.out[2].weight.dtype == torch.float32 and half.time_embed[0].weight.dtype == torch.float32
    assert half.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # norms stay fp32
    with torch.no_grad():
        out = half(x, t, y)
    assert out.dtype == torch.float32


def test_dropout_only_in_training():
    model = randomize_(build_model(tiny(dropout=0.5)))
    x, t, y = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model(x, t, y))
        model.train()
        assert not torch.equal(model(x, t, y), model(x, t, y))


@pytest.mark.parametrize("kw,match", [
    (dict(arch="gan"), "model.arch"),
    (dict(pool="max"), "model.pool"),
    (dict(model_channels=48), "multiple of 32"),
    (dict(image_size=36, channel_mult=[1, 2, 2, 2], attention_resolutions=[9]), "not divisible by 2"),
    (dict(channel_mult=[], image_size=48, attention_resolutions=[8]), "no ADM default for image_size=48"),
    (dict(attention_resolutions=[5]), "does not divide image_size"),
    (dict(arch="upsampler", small_size=0), "small_size"),
    (dict(arch="classifier", num_classes=None), "num_classes"),
    (dict(dropout=1.5), "dropout"),
])
def test_config_validation_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)
