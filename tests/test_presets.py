"""Every preset builds; parameter counts equal the paper's; layouts equal the released checkpoints'."""

import pytest
import torch

from models import adm_compat
from models.config import build_model, count_parameters, expected_layout
from models.presets import PRESETS, get_preset

# preset -> entry in the released-layout file (LSUN shares the unconditional 256 layout)
RELEASED = {"adm-64": "adm-64", "adm-128": "adm-128", "adm-256": "adm-256", "adm-256-uncond": "adm-256-uncond",
            "adm-512": "adm-512", "adm-lsun": "adm-256-uncond", "upsampler-64-256": "upsampler-64-256",
            "upsampler-128-512": "upsampler-128-512", "classifier-64": "classifier-64",
            "classifier-128": "classifier-128", "classifier-256": "classifier-256", "classifier-512": "classifier-512"}

# Paper Tables 11-13 (millions), independent of the preset table itself.
PAPER_M = {"adm-64": 296, "adm-128": 422, "adm-256": 554, "adm-512": 559, "adm-lsun": 552,
           "upsampler-64-256": 312, "upsampler-128-512": 309, "classifier-64": 65, "classifier-128": 43,
           "classifier-256": 54, "classifier-512": 54}


def test_every_published_model_has_a_preset():
    assert set(RELEASED) <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PAPER_M))
def test_parameter_count_matches_paper(name):
    n = count_parameters(get_preset(name).config())
    # the paper prints whole millions; LSUN's 552.8M is printed as 552M, so allow < 1M either way
    assert abs(n / 1e6 - PAPER_M[name]) < 1.0, (name, n)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_layout_matches_released_checkpoint(name, released_layouts):
    ref = released_layouts[RELEASED[name]]
    expected = {k: tuple(v) for k, v in ref["state_dict"].items()}
    ours = expected_layout(get_preset(name).config())
    assert list(ours) == list(expected)  # same keys in the same order
    assert ours == expected
    assert count_parameters(get_preset(name).config()) == ref["params"]


@pytest.mark.parametrize("entry", ["adm-64", "adm-128", "adm-256", "adm-256-uncond", "adm-512", "upsampler-64-256",
                                   "upsampler-128-512", "classifier-64", "classifier-128", "classifier-256",
                                   "classifier-512"])
def test_guided_diffusion_flags_give_released_layout(entry, released_layouts):
    ref = released_layouts[entry]
    cfg = adm_compat.config_from_flags(ref["flags"])
    assert expected_layout(cfg) == {k: tuple(v) for k, v in ref["state_dict"].items()}


def test_counting_happens_on_the_meta_device():
    with torch.device("meta"):
        model = build_model(get_preset("adm-512").config())
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count_parameters(get_preset("adm-512").config())


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny")])
def test_tiny_presets_run_forward_backward(name):
    cfg = get_preset(name).config()
    torch.manual_seed(0)
    model = build_model(cfg)
    n = 2
    x = torch.randn(n, 3, cfg.image_size, cfg.image_size)
    t = torch.tensor([0, 999])
    y = torch.tensor([0, cfg.num_classes - 1])
    if cfg.arch == "classifier":
        out = model(x, t)
        assert out.shape == (n, cfg.num_classes)
        loss = torch.nn.functional.cross_entropy(out, y)
    else:
        kw = dict(low_res=torch.randn(n, 3, cfg.small_size, cfg.small_size)) if cfg.arch == "upsampler" else {}
        out = model(x, t, y=y, **kw)
        assert out.shape == (n, cfg.out_channels, cfg.image_size, cfg.image_size)
        loss = (out[:, :3] - x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="unknown model preset 'adm-1024'.*adm-64"):
        get_preset("adm-1024")
