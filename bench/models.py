"""Throughput of our ADM networks against the reference implementation (guided-diffusion), same weights.

Reports images/s for forward+backward (a training step without the optimizer) and forward-only
(a sampling step), FLOPs per image from torch.utils.flop_counter, and MFU on a GPU. Ours and the
reference are timed alternately, several rounds each, and the median taken, so the ratio is measured
in one run under the same conditions. Absolute CPU numbers depend on the machine; quote ratios.

    .venv/bin/python bench/models.py --out bench/out/models.json            # CPU defaults
    .venv/bin/python bench/models.py --channels-last ours --out ...   # ours channels-last vs reference as shipped
    .venv/bin/python bench/models.py --device cuda --dtype bf16 --channels-last ours --out ...  # GPU
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_device_args, resolve, save_partial, write_result  # noqa: E402
from models.config import ModelConfig, build_model  # noqa: E402
from models.layers import set_norm_io  # noqa: E402
from models.presets import get_preset  # noqa: E402

# (label, preset, overrides, batch on CPU, batch on GPU)
CPU_CASES = [
    ("tiny-32", "tiny-32", {}, 16, 256),
    ("tiny-classifier-32", "tiny-classifier-32", {}, 16, 256),
    ("tiny-upsampler-32-64", "tiny-upsampler-32-64", {}, 8, 128),
    # the published 64x64 layout (attention at 32, 16, 8; 64-channel heads) at a third of the width
    ("adm-64 @ width 64", "adm-64", {"model_channels": 64, "dropout": 0.0}, 4, 128),
]
# the larger last (a time limit costs them, not the rest); batches that fit an 80 GB H100 with the --layouts
# and --norm-io copies beside ours and the reference (ADM-256 at 16 kept ~64 GiB of activations alone)
GPU_CASES = CPU_CASES + [
    ("adm-64", "adm-64", {"dropout": 0.0}, None, 64),
    ("classifier-128", "classifier-128", {}, None, 128),
    ("adm-128", "adm-128", {}, None, 32),
    ("upsampler-64-256", "upsampler-64-256", {}, None, 12),
    ("adm-256", "adm-256", {}, None, 8),
]
# dense bf16, by device name; the first name contained in torch's name wins, so the specific ones come first
PEAK_TFLOPS = {"H200 NVL": 835.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "A10": 125.0}


def reference_model(cfg: ModelConfig):
    """guided-diffusion's module for the same architecture (None if the package is missing)."""
    try:
        from guided_diffusion import unet as gd
    except ImportError:
        return None
    kw = dict(image_size=cfg.image_size, in_channels=cfg.in_channels, model_channels=cfg.model_channels,
              out_channels=cfg.out_channels, num_res_blocks=cfg.num_res_blocks,
              attention_resolutions=tuple(cfg.image_size // r for r in cfg.attention_resolutions),
              dropout=cfg.dropout, channel_mult=cfg.resolved_channel_mult(), num_heads=cfg.num_heads,
              num_head_channels=cfg.num_head_channels, use_scale_shift_norm=cfg.use_scale_shift_norm,
              resblock_updown=cfg.resblock_updown, use_new_attention_order=cfg.use_new_attention_order)
    if cfg.arch == "classifier":
        return gd.EncoderUNetModel(pool=cfg.pool, **kw)
    kw.update(num_classes=cfg.num_classes, num_heads_upsample=cfg.num_heads_upsample)
    if cfg.arch == "upsampler":
        kw["in_channels"] = cfg.in_channels
        return gd.SuperResModel(**kw)
    return gd.UNetModel(**kw)


def make_inputs(cfg: ModelConfig, batch: int, device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    args, kwargs = [x, torch.randint(0, 1000, (batch,), generator=g)], {}
    if cfg.arch == "upsampler":
        kwargs["low_res"] = torch.randn(batch, cfg.in_channels, cfg.small_size, cfg.small_size, generator=g)
    if cfg.class_cond:
        kwargs["y"] = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    args = [a.to(device) for a in args]
    args[0] = args[0].contiguous(memory_format=fmt)
    return args, {k: v.to(device) for k, v in kwargs.items()}


def step_fn(model, args, kwargs, train: bool, dtype, device, autocast: bool = True):
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast and dtype != torch.float32):
            if train:
                out = model(*args, **kwargs)
                out.float().square().mean().backward()
            else:
                with torch.no_grad():
                    model(*args, **kwargs)
    return step


def timed(step, device, iters: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def flops_per_image(model, args, kwargs, train: bool, batch: int) -> float:
    """Model FLOPs (MFU's convention: what the model's arithmetic needs, no recomputation), with attention as
    plain matmuls: torch's counter has no formula for the CPU attention kernel (a CPU count left attention
    out, 15% of ADM-64's), and its formulas for the CUDA kernels add the backward's recomputed scores."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        if train:
            model(*args, **kwargs).float().square().mean().backward()
        else:
            with torch.no_grad():
                model(*args, **kwargs)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def meta_flops_per_image(cfg: ModelConfig, train: bool) -> float:
    """flops_per_image of one image on the meta device: shapes only, no memory (counted on the device at the
    timed batch, in float32 with attention as matmuls, it held more than an H100 has at ADM-256)."""
    with torch.device("meta"):
        model = build_model(cfg)
    args, kwargs = make_inputs(cfg, 1, torch.device("meta"), False)
    return flops_per_image(model, args, kwargs, train, 1)


def bench_case(label, preset, overrides, batch, args_ns, device, dtype, peak):
    cfg = ModelConfig(**{**get_preset(preset).model, **overrides})
    torch.manual_seed(0)
    ours = build_model(cfg)
    ref = reference_model(cfg) if args_ns.reference else None
    if ref is not None:
        ref.load_state_dict(ours.state_dict(), strict=True)  # same weights
    cl = {"ours": args_ns.channels_last in ("both", "ours"), "reference": args_ns.channels_last == "both"}
    layouts = {}  # name -> (model, channels-last inputs): ours in other memory layouts, same weights
    import copy
    if args_ns.layouts:  # NCHW throughout; and the trainer's (weights flat and contiguous, inputs channels-last)
        layouts = {"ours_nchw": (copy.deepcopy(ours), False), "ours_cl_inputs": (copy.deepcopy(ours), True)}
    pure = set()  # run as the trainer runs them: weights and inputs in the dtype (DeepSpeed's bf16), no autocast
    if args_ns.norm_io:  # GroupNorm float32 in and out (ADM's) against norm_fp32=false (in the dtype, no copies)
        layouts["ours_pure"] = (copy.deepcopy(ours), cl["ours"])
        layouts["ours_pure_norm_io"] = (set_norm_io(copy.deepcopy(ours), False), cl["ours"])
        pure = {"ours_pure", "ours_pure_norm_io"}
    models = {"ours": ours.to(device, memory_format=torch.channels_last if cl["ours"] else torch.contiguous_format)}
    if ref is not None:
        models["reference"] = ref.to(device, memory_format=torch.channels_last if cl["reference"] else torch.contiguous_format)
    for name, (model, cl_inputs) in layouts.items():
        models[name], cl[name] = model.to(device), cl_inputs
    inputs = {k: make_inputs(cfg, batch, device, cl[k]) for k in models}
    for k in pure:
        models[k] = models[k].to(dtype)
        args, kwargs = inputs[k]
        inputs[k] = ([a.to(dtype) if a.is_floating_point() else a for a in args],
                     {n: v.to(dtype) if v.is_floating_point() else v for n, v in kwargs.items()})
    row = {"case": label, "preset": preset, "overrides": overrides, "batch": batch,
           "params": sum(p.numel() for p in ours.parameters())}
    for mode in ("train", "forward"):
        train = mode == "train"
        steps = {k: step_fn(m.train(train), *inputs[k], train, dtype, device, autocast=k not in pure)
                 for k, m in models.items()}
        for s in steps.values():  # warm-up (kernel selection, allocator)
            for _ in range(args_ns.warmup):
                s()
        times = {k: [] for k in steps}
        for _ in range(args_ns.rounds):  # alternate so both see the same machine state
            for k, s in steps.items():
                times[k].append(timed(s, device, args_ns.iters))
        flops = meta_flops_per_image(cfg, train)
        for k, ts in times.items():
            sec = statistics.median(ts)
            row[f"{k}_{mode}_img_s"] = batch / sec
        row[f"{mode}_gflops_per_img"] = flops / 1e9
        if "reference" in times:
            row[f"{mode}_speedup"] = row[f"ours_{mode}_img_s"] / row[f"reference_{mode}_img_s"]
        if peak:
            row[f"ours_{mode}_mfu"] = flops * row[f"ours_{mode}_img_s"] / (peak * 1e12)
        for m in models.values():
            m.zero_grad(set_to_none=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--channels-last", choices=["none", "ours", "both"], default="none",
                   help="channels-last weights and activations for: neither model, ours only, or both")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip guided-diffusion")
    p.add_argument("--layouts", action="store_true", help="also time ours NCHW throughout and as the trainer runs it "
                   "(contiguous weights, channels-last inputs): whether channels-last pays on this device")
    p.add_argument("--norm-io", action="store_true", help="also time ours with GroupNorm in the model's dtype "
                   "(trainer norm_fp32=false) instead of float32 in and out")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (GPU default: by name)")
    p.add_argument("--out", type=Path, help="write JSON here")
    a = p.parse_args()

    device, dtype, cases = resolve(a, CPU_CASES, GPU_CASES)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if device.type == "cuda" else None
    rows = []
    result = {"device": name, "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
              "channels_last": a.channels_last, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "rows": rows}
    for label, preset, overrides, batch in cases:
        row = bench_case(label, preset, overrides, batch, a, device, dtype, peak)
        rows.append(row)
        save_partial(result, a.out)
        sp = " ".join(f"{m}: x{row[m + '_speedup']:.2f}" for m in ("train", "forward") if m + "_speedup" in row)
        print(f"{label:<24} batch {batch:>3}  train {row['ours_train_img_s']:8.1f} img/s  "
              f"forward {row['ours_forward_img_s']:8.1f} img/s  vs reference {sp}", flush=True)
    write_result(result, a.out)


if __name__ == "__main__":
    main()
