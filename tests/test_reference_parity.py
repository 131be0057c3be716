"""Same weights, same outputs as OpenAI's guided-diffusion (the PyPI package guided-diffusion-sdk),
for every architectural option; the reference's state dicts load into ours with strict=True."""

import inspect

import pytest
import torch

from conftest import randomize_
from models import adm_compat
from models.config import ModelConfig, build_model

gd_unet = pytest.importorskip("guided_diffusion.unet", reason="scripts/setup.sh installs guided-diffusion-sdk")
gd_script = pytest.importorskip("guided_diffusion.script_util")

UNET_FLAGS = {
    "all-on, new qkv order": dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                                  attention_resolutions="16,8", num_head_channels=32, use_scale_shift_norm=True,
                                  resblock_updown=True, use_new_attention_order=True, class_cond=True,
                                  learn_sigma=True),
    "legacy order, conv resample, additive emb": dict(image_size=32, num_channels=64, num_res_blocks=2,
                                                      channel_mult="1,2", attention_resolutions="32,16",
                                                      num_heads=2, num_heads_upsample=4,
                                                      use_scale_shift_norm=False, resblock_updown=False,
                                                      class_cond=False, learn_sigma=False),
    "default table 64, head width": dict(image_size=64, num_channels=32, num_res_blocks=1,
                                         attention_resolutions="8", num_head_channels=32, resblock_updown=True,
                                         class_cond=True, learn_sigma=True, dropout=0.1),
}


def assert_same(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = ref.abs().max().item()
    assert scale > 1e-3, "degenerate comparison: reference output is ~0"
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale)


def inputs(n, size, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    t = torch.tensor([0, 250, 999][:n] + [17] * max(0, n - 3))
    y = torch.randint(0, classes, (n,), generator=g) if classes else None
    return x, t, y


@pytest.mark.parametrize("name", list(UNET_FLAGS))
def test_unet_matches_reference(name):
    flags = UNET_FLAGS[name]
    ref = randomize_(gd_script.create_model(**flags)).eval()
    ours = adm_compat.create_model(**flags).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = inputs(3, flags["image_size"], 1000 if flags.get("class_cond") else None)
    with torch.no_grad():
        assert_same(ours(x, t, y), ref(x, t, y))


def test_fractional_channel_mult_matches_reference():
    kw = dict(image_size=32, model_channels=64, num_res_blocks=1, attention_resolutions=[8],
              channel_mult=[0.5, 1, 2], num_head_channels=32, num_classes=10, use_scale_shift_norm=True,
              resblock_updown=True)
    ref = gd_unet.UNetModel(in_channels=3, out_channels=6, **{**kw, "attention_resolutions": (4,)})
    randomize_(ref).eval()
    ours = build_model(ModelConfig(arch="unet", learn_sigma=True, **kw)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.input_blocks[0][0].out_channels == 32
    x, t, y = inputs(2, 32, 10)
    with torch.no_grad():
        assert_same(ours(x, t, y), ref(x, t, y))


def test_gradients_match_reference_with_checkpointing():
    flags = dict(UNET_FLAGS["all-on, new qkv order"], use_checkpoint=True)
    ref = randomize_(gd_script.create_model(**flags)).train()
    ours = adm_compat.create_model(**flags).train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = inputs(2, 32, 1000)
    ours(x, t, y).square().mean().backward()
    ref(x, t, y).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    # some grads are zero in exact arithmetic (a conv bias right before a 1-channel-per-group norm),
    # so the absolute tolerance is relative to the largest gradient of the model
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_fp16_trunk_matches_reference():
    """use_fp16 (the released runs' setting): the same parameters in half as guided-diffusion's convert_to_fp16
    leaves them (the trunk's convs; norms, embeddings and head in float32), and its outputs to within fp16's
    rounding. test_contracts looked at three modules' dtypes and never at the outputs."""
    flags = dict(UNET_FLAGS["all-on, new qkv order"], use_fp16=True)
    ref = gd_script.create_model(**flags)
    ref.convert_to_fp16()  # guided-diffusion's scripts convert after building
    randomize_(ref, scale=0.05).eval()
    ours = adm_compat.create_model(**flags).eval()
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = inputs(3, 32, 1000)
    with torch.no_grad():
        got, want = ours(x, t, y), ref(x, t, y)
    assert got.dtype == want.dtype == torch.float32
    scale = want.abs().max().item()
    assert scale > 1e-3, "degenerate comparison: reference output is ~0"
    # fp16 keeps 11 bits: the two fold the scale-shift norm differently, so the roundings differ a little
    torch.testing.assert_close(got, want, rtol=0, atol=5e-3 * scale)


@pytest.mark.parametrize("pool", ["attention", "adaptive", "spatial", "spatial_v2"])
def test_classifier_matches_reference(pool):
    # create_classifier fixes the channel multipliers by image size (none at 32), so build both directly
    kw = dict(image_size=32, in_channels=3, model_channels=32, out_channels=1000, num_res_blocks=1,
              attention_resolutions=(2, 4), channel_mult=(1, 2, 2), num_head_channels=32,
              use_scale_shift_norm=True, resblock_updown=True, pool=pool)
    ref = randomize_(gd_unet.EncoderUNetModel(**kw)).eval()
    ours = build_model(ModelConfig(arch="classifier", image_size=32, model_channels=32, num_classes=1000,
                                   num_res_blocks=1, attention_resolutions=[16, 8], channel_mult=[1, 2, 2],
                                   num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
                                   pool=pool)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, _ = inputs(3, 32, None)
    with torch.no_grad():
        assert_same(ours(x, t), ref(x, t))


def test_released_64_classifier_layout_matches_reference():
    flags = dict(adm_compat.classifier_defaults(), classifier_width=64, classifier_depth=1)
    ref = randomize_(gd_script.create_classifier(**flags)).eval()
    ours = adm_compat.create_classifier(**flags).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, _ = inputs(2, 64, None)
    with torch.no_grad():
        assert_same(ours(x, t), ref(x, t))


def test_upsampler_matches_reference():
    kw = dict(image_size=32, model_channels=32, num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2, 2),
              num_classes=10, num_heads=2, use_scale_shift_norm=True, resblock_updown=True)
    ref = randomize_(gd_unet.SuperResModel(in_channels=3, out_channels=6, **kw)).eval()
    ours = build_model(ModelConfig(arch="upsampler", small_size=16, learn_sigma=True,
                                   **{**kw, "attention_resolutions": [8], "channel_mult": [1, 2, 2]})).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = inputs(2, 32, 10)
    low = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_same(ours(x, t, low_res=low, y=y), ref(x, t, low_res=low, y=y))


def test_sr_flags_build_reference_layout():
    flags = dict(adm_compat.sr_model_and_diffusion_defaults(), large_size=64, small_size=32, num_channels=32,
                 num_res_blocks=1, class_cond=True, learn_sigma=True, attention_resolutions="8")
    ref_model, _ = gd_script.sr_create_model_and_diffusion(**flags)
    model_flags = {k: v for k, v in flags.items() if k in inspect.signature(adm_compat.sr_create_model).parameters}
    ours = adm_compat.sr_create_model(**model_flags).eval()
    randomize_(ref_model).eval()
    ours.load_state_dict(ref_model.state_dict(), strict=True)
    x, t, y = inputs(2, 64, 1000)
    low = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_same(ours(x, t, low_res=low, y=y), ref_model(x, t, low_res=low, y=y))
