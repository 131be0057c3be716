"""`adm demo`: show on this machine what the project does so far.

Today: build every model family at its tiny CPU preset, check each against the published layouts,
run a forward and backward pass, and print a summary. Later stages (data, training, evaluation,
report) join as they land.
"""

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table


def main(argv: list[str] | None = None, prog: str = "adm demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="images per forward/backward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from models.config import build_model, count_parameters
    from models.presets import PRESETS

    console = Console(width=110)
    console.rule("[bold]ADM at scale: demo")
    console.print("1. Published models: parameter counts from the layouts (meta device, no memory used)")
    table = Table()
    for col in ("preset", "params", "paper"):
        table.add_column(col, justify="right" if col != "preset" else "left")
    for name, p in PRESETS.items():
        if p.paper_params_m:
            table.add_row(name, f"{count_parameters(p.config()) / 1e6:.1f}M", f"{p.paper_params_m}M")
    console.print(table)

    console.print("2. Tiny models on the CPU: one forward + backward pass each")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    table = Table()
    for col in ("preset", "input", "output", "loss", "grad norm", "ms"):
        table.add_column(col)
    for name in ("tiny-32", "tiny-classifier-32", "tiny-upsampler-32-64"):
        cfg = PRESETS[name].config()
        model = build_model(cfg)
        n, s = args.batch, cfg.image_size
        x = torch.randn(n, cfg.in_channels, s, s, generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        y = torch.randint(0, cfg.num_classes, (n,), generator=gen)
        start = time.perf_counter()
        if cfg.arch == "classifier":
            out = model(x, t)
            loss = torch.nn.functional.cross_entropy(out, y)
        else:
            kw = {"low_res": torch.randn(n, 3, cfg.small_size, cfg.small_size, generator=gen)} if cfg.arch == "upsampler" else {}
            out = model(x, t, y=y, **kw)
            noise = torch.randn(x.shape, generator=gen)  # an epsilon-prediction target
            loss = torch.nn.functional.mse_loss(out[:, :cfg.in_channels], noise)
        loss.backward()
        ms = (time.perf_counter() - start) * 1e3
        grad = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
        table.add_row(name, str(tuple(x.shape)), str(tuple(out.shape)), f"{loss.item():.4f}", f"{grad.item():.3g}", f"{ms:.0f}")
    console.print(table)

    console.print("3. The diffusion: hybrid loss terms, then 10-step DDIM samples seeded per image")
    from models.adm_compat import diffusion_from_preset
    from models.sampling import sample_images

    preset = PRESETS["tiny-32"]
    model = build_model(preset.config()).eval()
    diffusion = diffusion_from_preset(preset.diffusion, learn_sigma=True)
    x0 = torch.rand(args.batch, 3, 32, 32, generator=gen) * 2 - 1
    t = torch.randint(0, diffusion.num_timesteps, (args.batch,), generator=gen)
    terms = diffusion.training_losses(model, x0, t, model_kwargs={"y": torch.zeros(args.batch, dtype=torch.long)},
                                      generator=gen)
    console.print("   per-sample loss = mse + vb: " + ", ".join(
        f"t={int(ti)}: {m:.3f} + {v:.3f}" for ti, m, v in zip(t, terms["mse"].tolist(), terms["vb"].tolist())))
    fast = diffusion_from_preset(preset.diffusion, learn_sigma=True, timestep_respacing="ddim10")
    seeds = list(range(args.batch))
    together, labels = sample_images(model, fast, seeds, 32, num_classes=10, use_ddim=True)
    alone = torch.cat([sample_images(model, fast, [s], 32, num_classes=10, use_ddim=True)[0] for s in seeds])
    console.print(f"   {len(seeds)} samples, labels {labels.tolist()}; sampled one at a time they differ by at most "
                  f"{(together - alone).abs().max().item():.1e} (image i depends only on seed i)")
    console.print("Next: `adm models list`, `adm models describe adm-64`, `adm models convert CKPT.pt SNAPSHOT/`.")
    return 0
