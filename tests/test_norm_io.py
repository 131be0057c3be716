"""GroupNorm's input/output dtype (the trainer's norm_fp32): ADM's float32 in and out by default; with
set_norm_io(model, False) a bf16 model normalises in bf16 (its kernels accumulate in float32 anyway), so no
float32 copy of an activation is made; float32 and float64 models are untouched either way."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.config import ModelConfig, build_model
from models.layers import set_norm_io
from models.presets import get_preset


class NormDtypes(TorchDispatchMode):
    """The dtypes every group norm of a forward pass reads."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.native_group_norm.default:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _model_and_inputs(dtype):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**get_preset("tiny-32").model, "num_classes": 10})
    model = build_model(cfg)
    with torch.no_grad():  # ADM zero-initialises each residual branch's last conv: make them count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(dtype)  # the same weights at every dtype
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g).to(dtype)
    return model, (x, torch.tensor([10, 900])), {"y": torch.tensor([3, 7])}


def _run(model, args, kwargs):
    mode = NormDtypes()
    with torch.no_grad(), mode:
        out = model(*args, **kwargs)
    return out, set(mode.seen)


def test_bf16_norms_run_in_bf16_only_when_asked_and_stay_close():
    model, args, kwargs = _model_and_inputs(torch.bfloat16)
    adm, adm_dtypes = _run(model, args, kwargs)
    fast, fast_dtypes = _run(set_norm_io(model, False), args, kwargs)
    assert adm_dtypes == {torch.float32} and fast_dtypes == {torch.bfloat16}
    exact, exact_dtypes = _run(*_model_and_inputs(torch.float64))  # the same weights, in float64
    assert exact_dtypes == {torch.float64}
    err_adm = (adm.double() - exact).abs().max().item()
    err_fast = (fast.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err_adm < 0.05 * scale and err_fast < 0.05 * scale, (err_adm, err_fast, scale)  # bf16's rounding
    assert err_fast < 4 * err_adm + 1e-3 * scale, (err_fast, err_adm)  # no worse than a few bf16 roundings more


def test_float32_models_are_untouched():
    model, args, kwargs = _model_and_inputs(torch.float32)
    before, dtypes = _run(model, args, kwargs)
    after, dtypes_after = _run(set_norm_io(model, False), args, kwargs)
    assert dtypes == dtypes_after == {torch.float32} and torch.equal(before, after)
    set_norm_io(model, True)
    assert all(m.fp32_io for m in model.modules() if hasattr(m, "fp32_io"))
