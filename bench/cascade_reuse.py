"""A cascade that takes its base images from a plain evaluation's shard (the farm's eval.farm.reusable_base)
against the same cascade sampling them itself: same models, seeds and settings, back to back in one process,
best of --rounds each. The two must give identical images (the result says whether they did).

    .venv/bin/python bench/cascade_reuse.py --out bench/out/cascade-reuse.json      # the demo's model sizes
    .venv/bin/python bench/cascade_reuse.py --base RUN/snapshots/img... --upsampler UP/snapshots/img... \\
        --steps 50 --upsampler-steps 25 --num 100 --out bench/out/cascade-reuse-demo.json

Without --base/--upsampler it times randomly initialised models of the demo's sizes (a 64-channel UNet at
16x16 with multipliers 1,1,2; the 16 -> 32 upsampler with 64 channels at every level): the time does not
depend on the weights.
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402


def demo_sized_snapshots(root: Path) -> tuple[str, str]:
    from models.config import build_model
    from models.presets import get_preset
    from models.snapshot import save_snapshot

    torch.manual_seed(0)
    out = []
    for name, preset, changes in (("base", "tiny-32", dict(image_size=16, model_channels=64, channel_mult=[1, 1, 2])),
                                  ("up", "tiny-upsampler-32-64", dict(image_size=32, small_size=16,
                                                                      channel_mult=[2, 2, 2]))):
        p = get_preset(preset)
        cfg = dataclasses.replace(p.config(), **changes)
        save_snapshot(root / name, build_model(cfg).state_dict(), cfg, meta={"diffusion": p.diffusion})
        out.append(str(root / name))
    return out[0], out[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="diffusion snapshot (default: a random one of the demo's size)")
    p.add_argument("--upsampler", help="upsampler snapshot (default: a random one of the demo's size)")
    p.add_argument("--num", type=int, default=32, help="images (one shard)")
    p.add_argument("--steps", default="50")
    p.add_argument("--upsampler-steps", default="25")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench/out/cascade-reuse.json"))
    a = p.parse_args(argv)
    if bool(a.base) != bool(a.upsampler):
        p.error("--base and --upsampler go together")

    from eval.base_samples import BaseSamples
    from eval.sample import Sampler
    from eval.settings import EvalSetting

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, up = (a.base, a.upsampler) if a.base else demo_sized_snapshots(tmp)
        common = dict(steps=a.steps, num=a.num, shard_size=a.num, batch_size=a.num)
        plain = Sampler(base, EvalSetting(name="plain", **common), a.device)
        cascade = Sampler(base, EvalSetting(name="cascade", upsampler=up, upsampler_steps=a.upsampler_steps,
                                            **common), a.device)
        seeds = list(range(a.num))
        low = plain.shard(seeds, tmp / "plain")
        rows = BaseSamples(low, plain.snap.config.image_size, cascade.num_classes, 0, a.num)
        times = {"cascade": [], "reuse": []}
        shards = {}
        for r in range(a.rounds):  # interleaved, each into a folder of its own (a finished shard is skipped)
            for kind, base_rows in (("cascade", None), ("reuse", rows)):
                start = time.perf_counter()
                shards[kind] = cascade.shard(seeds, tmp / f"{kind}{r}", base=base_rows)
                times[kind].append(time.perf_counter() - start)
        identical = all(np.array_equal(np.load(shards["cascade"])[k], np.load(shards["reuse"])[k])
                        for k in np.load(shards["cascade"]).files)
    best = {k: min(v) for k, v in times.items()}
    result = {"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(), "num": a.num,
              "steps": a.steps, "upsampler_steps": a.upsampler_steps, "models": "given" if a.base else "demo-sized",
              "seconds": best, "all_seconds": times, "reuse_over_cascade": best["reuse"] / best["cascade"],
              "identical": identical}
    write_result(result, a.out)
    print(f"cascade {best['cascade']:.2f} s, reusing the base images {best['reuse']:.2f} s "
          f"({result['reuse_over_cascade']:.2f}x the time); identical images: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
