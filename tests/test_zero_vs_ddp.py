"""ZeRO 1, 2 and 3 follow plain data parallel: the trainer's DeepSpeed configuration (AdamW with weight
decay, gradient clipping, gradient accumulation averaged over micro-batches) driving the tiny ADM UNet on
the hybrid diffusion loss, against torch's DistributedDataParallel with torch's AdamW, clipping and
accumulation written out in bench/zero_vs_ddp.py (the same script measures their throughput). Same
initial weights, per-rank batches, timesteps and noise; 2 gloo ranks under torchrun; fp32, dropout off.

Compared: the pre-clipping gradient norm of every step (scale-sensitive: summed micro-batches would double
it) and the trained model's outputs on a fixed probe batch. Not the raw weights: parameters whose gradient
is at rounding level (below Adam's eps) take steps proportional to that rounding noise, which ZeRO-2/3's
per-micro-batch reduction changes (their weights differ by up to ~2e-4 after 3 steps of lr 3e-3), while
the outputs do not depend on them."""

import re
import subprocess
import sys

from conftest import REPO

OUTPUT_TOL = 1e-3  # outputs may differ by this fraction of the change the 3 training steps made to them
NORM_TOL = 1e-5  # relative, per step (measured: 2e-7)


def test_zero_stages_follow_plain_data_parallel():
    proc = subprocess.run([sys.executable, "bench/zero_vs_ddp.py", "--check", "--precision", "fp32", "--steps", "3",
                           "--warmup", "0", "--micro", "2", "--accum", "2", "--rtol", str(OUTPUT_TOL), "--port", "29633"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    oks = [line for line in proc.stdout.splitlines() if " ok: " in line]
    print("\n".join(oks))
    assert [line.split(":")[0] for line in oks] == ["stage 1 ok", "stage 2 ok", "stage 3 ok"]
    for line in oks:
        apart, moved = map(float, re.search(r"\(([\d.e+-]+) of ([\d.e+-]+)\)", line).groups())
        norm_err = float(re.search(r"gradient norms within ([\d.e+-]+)", line).group(1))
        assert moved > 0.1 and apart < OUTPUT_TOL * moved and norm_err < NORM_TOL, line
