"""Plain data parallel against DeepSpeed ZeRO 1/2/3 as the trainer configures it, at the same batch: the
optimiser step of `adm train` (trainer.loop.deepspeed_config: AdamW, clipping, accumulation) against torch's
DistributedDataParallel with torch's AdamW, clipping and accumulation written out here. Same model, same
per-rank micro-batches, timesteps and noise, the hybrid diffusion loss. Reports images/s per variant and
ZeRO-k / DDP ratios (target: ZeRO-2 within 5%). All variants live side by side and their steps alternate,
so drift on a shared machine falls on all of them alike. `--zero JSON` merges DeepSpeed settings into the
zero_optimization section (e.g. '{"overlap_comm": true}'), for tuning on a cluster. `--check` also
compares the final weights of every stage with DDP's (fp32 only), which is how tests/test_zero_vs_ddp.py
uses it.

    .venv/bin/python bench/zero_vs_ddp.py --out bench/results/zero_vs_ddp.json          # 2 gloo ranks, CPU
    .venv/bin/python bench/zero_vs_ddp.py --nproc 8 --preset adm-64 --micro 32 --precision bf16   # a GPU node
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def setup(a):
    from models.adm_compat import create_gaussian_diffusion
    from trainer.config import load_train_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_train_config(None, [f"preset={a.preset}", f"precision={a.precision}", "model.dropout=0.0",
                                   f"batch={a.micro * a.accum * world}", "lr=3e-3", "weight_decay=0.05",
                                   "grad_clip=0.5"])
    d = cfg.diffusion
    return cfg, create_gaussian_diffusion(steps=d.steps, learn_sigma=cfg.model.learn_sigma,
                                          noise_schedule=d.noise_schedule)


def batches(cfg, a, rank: int, device):
    """This rank's micro-batches for every step (images, labels, timesteps, noise), fixed by rank."""
    g = torch.Generator().manual_seed(100 + rank)
    size, out = cfg.model.image_size, []
    for _ in range(a.steps * a.accum):
        x = torch.rand(a.micro, 3, size, size, generator=g) * 2 - 1
        y = torch.randint(0, cfg.model.num_classes or 1, (a.micro,), generator=g)
        t = torch.randint(0, 1000, (a.micro,), generator=g)
        out.append(tuple(v.to(device) for v in (x, y, t, torch.randn(a.micro, 3, size, size, generator=g))))
    return out


def loss_of(diffusion, net, batch, cast):
    x, y, t, noise = batch

    def model(inp, ts, **kw):
        return net(inp.to(cast), ts, **kw).float()

    return diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()


def timed(step, i) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(i)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_ddp(cfg, diffusion, init, data, a, device):
    """Plain data parallel, written out: DDP averages the gradients over ranks, micro-batch losses are
    divided by the accumulation count, the global gradient norm is clipped, AdamW steps. bf16 by autocast
    over fp32 weights (the usual mixed precision of plain DDP)."""
    from torch.nn.parallel import DistributedDataParallel

    from models.config import build_model

    model = build_model(cfg.model).to(device)
    model.load_state_dict(init)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8,
                            weight_decay=cfg.weight_decay)
    amp = torch.autocast(device.type, torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()
    norms = []

    def step(i):
        for k in range(a.accum):
            with ddp.no_sync() if k < a.accum - 1 else contextlib.nullcontext(), amp:
                loss = loss_of(diffusion, ddp, data[i * a.accum + k], torch.float32)
            (loss / a.accum).backward()
        if cfg.grad_clip > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)

    def weights():
        return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}

    return step, weights, norms


def run_zero(cfg, diffusion, init, data, a, stage):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from models.config import build_model
    from trainer.loop import deepspeed_config

    cfg.zero_stage = stage
    model = build_model(cfg.model)
    model.load_state_dict(init)
    config = deepspeed_config(cfg, a.micro, a.accum, cuda=torch.cuda.is_available())  # as the trainer
    config["zero_optimization"].update(json.loads(a.zero))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    cast = next(engine.module.parameters()).dtype
    norms = []

    def step(i):
        for k in range(a.accum):
            engine.backward(loss_of(diffusion, engine, data[i * a.accum + k], cast))
            engine.step()
        norms.append(float(engine.get_global_grad_norm() or 0.0))

    def weights():
        return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}

    return step, weights, norms


@torch.no_grad()
def output_change(cfg, init, expected, weights) -> tuple[float, float]:
    """(how far training moved the model's outputs, how far apart ZeRO's and DDP's outputs are), as max
    |difference| over a fixed probe batch. Outputs, not weights: parameters whose gradient is at rounding
    level (below Adam's eps: biases in front of a normalisation, layers behind the zero-initialised output
    at the first step) take steps proportional to that noise, which reduction order changes, but the
    outputs do not depend on them."""
    from models.config import build_model

    g = torch.Generator().manual_seed(12345)
    size = cfg.model.image_size
    x = torch.randn(8, 3, size, size, generator=g)
    t = torch.linspace(0, 999, 8).long()
    y = torch.randint(0, cfg.model.num_classes or 1, (8,), generator=g)
    outs = []
    for state in (init, expected, weights):
        model = build_model(cfg.model).eval()
        model.load_state_dict({k: v.float() for k, v in state.items()})
        outs.append(model(x, t, y=y))
    return (outs[1] - outs[0]).abs().max().item(), (outs[2] - outs[1]).abs().max().item()


def worker(a):
    import deepspeed
    import torch.distributed as dist

    from models.config import build_model
    from trainer.distributed import ops_dir

    ops_dir()  # the trainer's (and scripts/setup.sh's) build of DeepSpeed's CPU op
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg, diffusion = setup(a)
    data = batches(cfg, a, rank, device)
    torch.manual_seed(0)
    init = build_model(cfg.model).state_dict()
    images_per_step = a.micro * a.accum * world
    # every variant lives side by side and their steps alternate (ddp, zero1, zero2, ... then the next step), so
    # a slow spell of a shared machine hits all of them alike instead of whichever ran in it
    variants = {"ddp": run_ddp(cfg, diffusion, init, data, a, device)}
    for stage in a.stages:
        variants[f"zero{stage}"] = run_zero(cfg, diffusion, init, data, a, stage)
    times = {name: [] for name in variants}
    for i in range(a.steps):
        for name, (step, _, _) in variants.items():
            times[name].append(timed(step, i))
    rows = [{"variant": name, "images_per_s": images_per_step / statistics.median(t[a.warmup:])}
            for name, t in times.items()]
    _, ddp_weights, ddp_norms = variants.pop("ddp")
    expected = ddp_weights()
    for stage in a.stages:
        _, get_weights, norms = variants[f"zero{stage}"]
        if a.check:
            weights = get_weights()
            moved, apart = output_change(cfg, init, expected, weights)
            worst = max((weights[n] - expected[n]).abs().max().item() for n in weights)
            # the gradient norm before clipping, step by step: scale-sensitive where Adam and clipping are not
            # (micro-batches summed instead of averaged would double it)
            norm_err = max(abs(z / d - 1) for z, d in zip(norms, ddp_norms))
            if rank == 0:
                print(f"stage {stage} ok: outputs apart {apart / moved:.2e} of their change in training "
                      f"({apart:.2e} of {moved:.2e}); gradient norms within {norm_err:.1e} of DDP's "
                      f"({', '.join(f'{n:.4g}' for n in ddp_norms)}); max weight difference {worst:.2e}", flush=True)
            if norm_err > a.rtol:
                raise SystemExit(f"stage {stage}: gradient norms {norms} vs DDP's {ddp_norms}")
            if apart > a.rtol * moved:
                raise SystemExit(f"stage {stage}: outputs {apart:.3e} apart from DDP's, more than {a.rtol} x the "
                                 f"change training made ({moved:.3e})")
    if rank == 0:
        ddp = rows[0]["images_per_s"]
        for r in rows[1:]:
            r["vs_ddp"] = r["images_per_s"] / ddp
        result = {"preset": a.preset, "precision": a.precision, "world_size": world, "micro_batch": a.micro,
                  "accumulation": a.accum, "global_batch": images_per_step, "steps": a.steps, "warmup": a.warmup,
                  "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (gloo)", "rows": rows}
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-32")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--micro", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--stages", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--check", action="store_true", help="compare every stage's final weights with DDP's")
    p.add_argument("--rtol", type=float, default=1e-3, help="--check: outputs may differ by this fraction of "
                   "the change training made to them")
    p.add_argument("--zero", default="{}", help="JSON merged into DeepSpeed's zero_optimization section")
    p.add_argument("--port", type=int, default=29641)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if "RANK" in os.environ:
        return worker(a)
    if a.check and a.precision != "fp32":
        raise SystemExit("--check compares weights: use --precision fp32")
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available()
                                                             else "cpu"), OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", "1"))
    with tempfile.TemporaryDirectory() as tmp:  # torchrun leaves a torchelastic_* folder of its logs in TMPDIR
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
                               "--master-port", str(a.port), __file__, *sys.argv[1:]], cwd=REPO,
                              env=dict(env, TMPDIR=tmp), capture_output=True, text=True)
    print("\n".join(line for line in proc.stdout.splitlines() if " ok: " in line), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"zero_vs_ddp failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    from bench.common import write_result

    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    write_result(result, a.out)


if __name__ == "__main__":
    main()
