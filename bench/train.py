"""Training throughput per ZeRO stage, checkpoint save bandwidth against the disk's, and the time from
process start to the first step after a resume. Runs the real `adm train` (2 local ranks on CPU).

    .venv/bin/python bench/train.py --out bench/out/train.json
    .venv/bin/python bench/train.py --preset adm-64 --data shards/in64 --nproc 8 ...   # on a GPU node
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import save_partial, write_result  # noqa: E402


def disk_write_mib_s(directory: Path, mib: int = 256, fsync: bool = True, repeats: int = 3) -> float:
    """Sequential write of `mib` MiB (then fsync, as a checkpoint save does): the bandwidth a save can hope
    for. The median of a few runs, since a single one swings with the page cache."""
    block = os.urandom(1 << 20)
    speeds = []
    for i in range(repeats):
        path = directory / f"disk-probe-{i}.bin"
        start = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(block)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        speeds.append(mib / (time.perf_counter() - start))
        path.unlink()
    return statistics.median(speeds)


def make_data(tmp: Path, resolution: int = 32) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from imagenet_fixture import make_imagenet

    from data_pipeline.sources import read_source
    from data_pipeline.writer import write_dataset

    make_imagenet(tmp / "digits", per_class=40)
    write_dataset(read_source(tmp / "digits", "imagenet", "train"), tmp / "shards", shard_size=16,
                  preprocess=f"center-crop:{resolution}", image_format="npy", progress=False)
    return tmp / "shards"


def train_command(args, run_dir, *extra):
    return [sys.executable, "-m", "adm", "train", f"preset={args.preset}", f"data={args.data}", f"run_dir={run_dir}",
            *args.overrides, *extra, "--nproc", str(args.nproc)]


def run(args, run_dir, *extra):
    cmd = train_command(args, run_dir, *extra)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr  # the status lines and timings, then the log (what was resumed)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-32")
    p.add_argument("--data", help="shards (default: the digits, built here)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--resolution", type=int, default=32, help="of the digit shards built when --data is not given")
    p.add_argument("--kimg", type=float, default=0.768)
    p.add_argument("--overrides", nargs="*", default=["model.num_classes=11", "batch=32", "num_slots=4",
                                                      "data_workers=1"])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                   help="ZeRO stages to time; the resume is timed on ZeRO-2 when it is among them")
    p.add_argument("--no-drill", dest="drill", action="store_false", help="skip the preemption drill")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a.data = a.data or str(make_data(tmp, a.resolution))
        disk = disk_write_mib_s(tmp)
        buffered = disk_write_mib_s(tmp, fsync=False)
        rows = []
        result = {"preset": a.preset, "nproc": a.nproc, "disk_write_mib_s": disk, "disk_write_buffered_mib_s": buffered,
                  "rows": rows}
        resumed = 2 if 2 in a.stages else a.stages[-1]
        # the resumed stage first and its resume right after: a time limit then costs the other stages' rows,
        # not the resume (a headline number)
        for stage in [resumed] + [s for s in a.stages if s != resumed]:
            out = run(a, tmp / f"z{stage}", f"zero_stage={stage}", f"total_kimg={a.kimg}", f"status_kimg={a.kimg / 3}",
                      f"checkpoint_kimg={a.kimg}", f"snapshot_kimg={a.kimg}", "grid=false")
            rates = [float(x) for x in re.findall(r"\|\s+([\d.]+) img/s", out)]
            save = re.search(r"\[ckpt\] saved \S+ in ([\d.]+) s \(([\d.]+) MiB, ([\d.]+) MiB/s\)", out)
            rate = statistics.median(rates[1:] or rates)
            flops = train_flops_per_image(tmp / f"z{stage}")
            peak = peak_flops()
            rows.append({"zero_stage": stage, "images_per_s": rate, "s_per_kimg": 1000 / rate,
                         "gflops_per_img": flops / 1e9, "mfu": flops * rate / (peak * a.nproc) if peak else None,
                         "checkpoint_s": float(save.group(1)), "checkpoint_mib": float(save.group(2)),
                         "checkpoint_mib_s": float(save.group(3)),
                         "checkpoint_fraction_of_disk": float(save.group(3)) / disk})
            print(rows[-1], flush=True)
            save_partial(result, a.out)
            if stage == resumed:
                result["resume_zero_stage"] = resumed
                out = run(a, tmp / f"z{resumed}", f"zero_stage={resumed}", f"total_kimg={a.kimg + 0.064}",
                          f"status_kimg={a.kimg}", "grid=false")
                first = re.search(r"\[timing\] first step done ([\d.]+) s after process start \(resumed\)", out)
                load = re.search(r"\[ckpt\] loaded \S+ in ([\d.]+) s \(([\d.]+) MiB, ([\d.]+) MiB/s\)", out)
                result.update(checkpoint_load_s=float(load.group(1)), checkpoint_load_mib_s=float(load.group(3)),
                              resume_to_first_step_s=float(first.group(1)))
                save_partial(result, a.out)
        if a.drill:  # last: two more launches and saves (5 GB each at ADM-64), which a time limit may cost
            result["preemption"] = preemption_drill(a, tmp / "preempted", resumed)
            print(result["preemption"], flush=True)
            save_partial(result, a.out)
    by_stage = {r["zero_stage"]: r["images_per_s"] for r in rows}
    if 1 in by_stage and 2 in by_stage:
        result["zero2_vs_zero1_throughput"] = by_stage[2] / by_stage[1]
    write_result(result, a.out)


def preemption_drill(args, run_dir: Path, stage: int, steps_before: int = 4) -> dict:
    """The preemption signal (SIGUSR2, submitit's) to `adm train`'s launcher mid-run, as Slurm sends it ahead of
    the kill: how long the ranks take from the signal to a committed checkpoint (finishing the step in
    flight, agreeing, saving), against one save's and one step's time, and whether the resumed run goes
    on from the images trained when the signal came (the lost steps; the target is none when the signal
    comes at least a save-duration ahead of the kill). The ranks agree one step late (the agreement's
    all-reduce overlaps the next step, no sync per step), so the grace a job needs is about two steps and a save."""
    batch = next(int(o.split("=", 1)[1]) for o in args.overrides + ["batch=0"] if o.startswith("batch="))
    long_run = [f"zero_stage={stage}", f"total_kimg={args.kimg * 50}", f"status_kimg={batch / 1000}",
                f"checkpoint_kimg={args.kimg * 100}", f"snapshot_kimg={args.kimg * 100}", "grid=false"]
    proc = subprocess.Popen(train_command(args, run_dir, *long_run), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    status, stamps, signalled, saved, lines = [], [], None, None, []
    for line in proc.stdout:
        lines.append(line)
        if m := re.match(r"\[train\]\s+([\d.]+) kimg \|", line):
            status.append(round(float(m.group(1)) * 1000))
            stamps.append(time.perf_counter())
            if len(status) == steps_before and signalled is None:
                proc.send_signal(signal.SIGUSR2)
                signalled = time.perf_counter()
        elif (m := re.search(r"\[ckpt\] saved \S+ in ([\d.]+) s", line)) and signalled is not None:
            saved = time.perf_counter(), float(m.group(1))
    code = proc.wait()
    at = re.search(r"preemption signal \(SIGUSR2\): saved at ([\d.]+) kimg", "".join(lines))
    if code != 75 or saved is None or at is None:
        raise SystemExit(f"the preemption drill ended with exit status {code} (expected 75 after a save):\n"
                         + "".join(lines[-40:]))
    saved_images = round(float(at.group(1)) * 1000)
    out = run(args, run_dir, *long_run[:1], f"total_kimg={(saved_images + batch) / 1000}", *long_run[2:])
    resumed = re.search(r"resumed from \S+ at ([\d.]+) kimg", out)
    resumed_images = round(float(resumed.group(1)) * 1000) if resumed else 0
    trained_at_signal = status[steps_before - 1]  # printed before the signal went: trained by then at least
    step_s = statistics.median(b - a for a, b in zip(stamps[:-1], stamps[1:]))
    return {"zero_stage": stage, "batch": batch, "images_at_signal": trained_at_signal, "images_saved": saved_images,
            "images_resumed_from": resumed_images, "lost_steps": max(0, trained_at_signal - resumed_images) // batch,
            "steps_after_signal": (saved_images - trained_at_signal) / batch, "signal_to_saved_s": saved[0] - signalled,
            "save_s": saved[1], "step_s": step_s}


def train_flops_per_image(run_dir: Path) -> float:
    """FLOPs of one training image (the model's forward and backward) for the model the run trained, as its
    training_options.json resolved it; counted on the meta device (shapes only, no arithmetic)."""
    import torch

    from bench.models import flops_per_image, make_inputs
    from models.config import ModelConfig, build_model

    cfg = ModelConfig(**json.loads((run_dir / "training_options.json").read_text())["model"])
    with torch.device("meta"):
        model = build_model(cfg)
    args, kwargs = make_inputs(cfg, 1, torch.device("meta"), False)
    return flops_per_image(model, args, kwargs, True, 1)


def peak_flops() -> float | None:
    """The GPU's dense bf16 peak (FLOP/s), or None (a CPU, or a GPU not in the table)."""
    import torch

    from bench.models import PEAK_TFLOPS

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


if __name__ == "__main__":
    main()
