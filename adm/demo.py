"""`adm demo`: the whole system on this machine, on real data, in 7 to 14 minutes on a 2-core machine without a GPU.

1. Data: the 1,797 handwritten digits scikit-learn ships, written in ImageNet's folder layout with a
   LOC_val_solution.csv validation split (200 held out), converted to WebDataset shards by
   `adm data write` (the ImageNet code path), at the base resolution and at twice it.
2. Training through the real trainer (DeepSpeed ZeRO-2, 2 processes, gloo on CPU, one per GPU where there are
   GPUs, at most 2; 2-task Slurm jobs
   through `adm submit train` when a Slurm answers): a small class-conditional ADM, interrupted once
   on purpose by the preemption signal and resumed; a noisy classifier; an upsampler to twice the
   resolution.
3. Evaluation through the real evaluation farm (the local Slurm if one answers, else this machine):
   every snapshot unguided, the last two also guided at two scales and through the upsampler,
   FID / sFID / precision / recall against the held-out digits with the real Inception weights.
4. The report (report.html): metric curves, tables, sample grids, progressive decoding, losses.
Re-running reuses what is done.
"""

import argparse
import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from eval.atomic import write_text_atomic

console = Console(width=110)
STAGES = ("data", "train", "eval", "report")

INTRO = """The 1,797 handwritten digits that scikit-learn ships were written in ImageNet's folder layout
(200 held out as the validation split, with a LOC_val_solution.csv label file) and converted to
WebDataset shards with adm data write. A small class-conditional ADM was trained on them at {res}x{res}
for {kimg:g} thousand images with DeepSpeed ZeRO-2 in {procs}; {preempted}. A noisy classifier (for guidance) and an
upsampler ({res} to {res2}{patches}) were trained the same way. The evaluation farm then sampled every
snapshot ({steps} sampling steps, {n} samples per evaluation, each image a function of its seed), guided the last two
snapshots with the classifier at scales {scales} and ran them through the upsampler, and scored
everything against the held-out digits with the FID Inception network.

FID and sFID: lower is better; precision and recall: higher is better. The reference here is only 200
digits, so absolute values are far above ImageNet's, and the trend is what matters. The digits are 8x8
scans enlarged smoothly, so plain bicubic enlargement is a strong upsampler here (the held-out 16x16
digits enlarged to 32x32 score FID 18.7, bench/RESULTS.md); the upsampler, trained for {up_kimg:g} thousand
images, is far from that, and its rows show the cascade at work rather than a finished upsampler.

On ImageNet on a cluster the same commands do the same (docs/GUIDE.md walks through them):"""

CLUSTER_COMMANDS = [
    "adm data write /data/imagenet shards/in64-train --layout imagenet --split train --preprocess center-crop:64",
    "adm data write /data/imagenet shards/in64-val --layout imagenet --split val --preprocess center-crop:64",
    "adm submit train configs/train/adm-64.yaml --nodes 4 --gpus-per-node 8",
    "adm eval ref shards/in64-val --out ref/in64-val.npz --resolution 64",
    "adm eval schedule runs/adm-64 --ref ref/in64-val.npz --settings configs/eval/adm.yaml --every 2h",
    "adm report runs/adm-64",
]


def adm(*args, check=True, capture=False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "adm", *args], capture_output=capture, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`adm {' '.join(args)}` failed with status {proc.returncode}"
                           + (f":\n{proc.stderr[-2000:]}" if capture else ""))
    return proc


def make_digits(root: Path, size: int) -> None:
    """The digits in ImageNet's layouts: train/<wnid>/..., flat val/ + LOC_val_solution.csv."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "val").mkdir(exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"n{k:08d} digit {k}\n" for k in range(10)))
    rows, per_class = ["ImageId,PredictionString"], {}
    for i, (img, k) in enumerate(zip(digits.images, digits.target)):
        k = int(k)
        arr = (img / 16.0 * 255).astype(np.uint8)
        pil = Image.fromarray(arr).resize((size, size), Image.BICUBIC).convert("RGB")
        per_class[k] = per_class.get(k, 0) + 1
        if per_class[k] <= 20:  # 200 held-out digits
            name = f"ILSVRC2012_val_{i:08d}"
            pil.save(root / "val" / f"{name}.JPEG", quality=95)
            rows.append(f"{name},n{k:08d} 0 0 {size} {size}")
        else:
            d = root / "train" / f"n{k:08d}"
            d.mkdir(exist_ok=True)
            pil.save(d / f"n{k:08d}_{i}.JPEG", quality=95)
    # written last, and whole: its presence says the digits are all there (a rerun skips this step)
    write_text_atomic(root / "LOC_val_solution.csv", "\n".join(rows) + "\n")


STATUS = ("[train]", "[ckpt]", "[timing]", "[resume]", "[preempt]")
FINAL_FAILURES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def slurm_answers() -> bool:
    return bool(shutil.which("sinfo")) and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def train(args: list[str], run: Path, what: str, preempt: bool = False, slurm: bool = False) -> None:
    """One training run to its end (skipped when already done): `adm train --nproc 2` here, or an
    `adm submit train` job when a Slurm answers. With `preempt`, the preemption signal is sent once after
    the first status line, and the run resumes from LATEST."""
    state = run / "demo-state"
    if state.is_file() and "DONE" in state.read_text():
        return
    console.print(f"   {what}")
    preempt = preempt and not state.is_file()
    (train_on_slurm if slurm else train_here)(args, run, preempt)
    preempted = state.is_file() and "preempted" in state.read_text()
    write_text_atomic(state, "DONE" + (", preempted once" if preempted else "") + "\n")  # the report's intro says which


def local_ranks() -> int:
    """One rank per GPU where there are GPUs (NCCL), at most 2; else 2 CPU ranks (gloo)."""
    import torch

    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2


def train_here(args: list[str], run: Path, preempt: bool) -> None:
    cmd = [sys.executable, "-m", "adm", "train", *args, "--nproc", str(local_ranks())]
    run.mkdir(parents=True, exist_ok=True)
    errors = open(run / "demo-train.err", "a")  # DeepSpeed's warnings stay out of the demo's output
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True)
    for line in proc.stdout:
        if line.startswith(STATUS):  # every training's status lines: minutes without a word look like a hang
            print("   " + line.rstrip())
        if preempt:
            if line.startswith("[train]") and not (run / "demo-state").is_file():
                console.print("   [yellow]sending the preemption signal (SIGUSR2) on purpose...[/yellow]")
                proc.send_signal(signal.SIGUSR2)
                write_text_atomic(run / "demo-state", "preempted once\n")
    code = proc.wait()
    if code == 75:
        console.print("   [yellow]the ranks saved together and exited (status 75, requeue): re-running the same "
                      "command resumes from LATEST[/yellow]")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True)
        for line in proc.stdout:
            if line.startswith(STATUS):
                print("   " + line.rstrip())
        code = proc.wait()
    errors.close()
    if code != 0:
        tail = (run / "demo-train.err").read_text()[-2000:]
        raise RuntimeError(f"training failed with status {code} ({' '.join(cmd)}):\n{tail}")


def train_on_slurm(args: list[str], run: Path, preempt: bool) -> None:
    """Submit (or follow the job an interrupted demo left queued or running), follow the job's log, send
    `scancel --signal=USR2` once while it runs (what Slurm sends before a preemption or the time limit) and
    wait: submitit requeues the job, which resumes from LATEST."""
    from slurm import records
    from slurm.submit import running_job_for

    busy = running_job_for(run)
    if busy and not busy.startswith("pid "):  # a Slurm job (not a training by hand): Ctrl-C left it running
        job = busy
        console.print(f"   [cyan]following Slurm job {job}, left running by an interrupted demo[/cyan]")
    else:
        before = len(records.read(run))
        adm("submit", "train", *args, "--gpus-per-node", "2", "--cpu", "--time", "01:00:00", capture=True)
        recs = records.read(run)
        if len(recs) == before:  # nothing queued: `adm submit` found the run trained (a job that ended meanwhile)
            console.print("   [cyan]already trained[/cyan]")
            return
        job = str(recs[-1]["job_id"])
        console.print(f"   [cyan]submitted to Slurm as job {job} (2 tasks); logs in {run / 'slurm' / job}[/cyan]")
    try:
        signalled = _follow(job, run, preempt)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"Slurm job {job} goes on training; run the demo again to follow it, or "
                                f"`adm jobs cancel {job} --run-dir {run}` to stop it") from None
    if signalled:
        console.print("   [yellow]the ranks saved together on the signal; submitit requeued the job, which resumed "
                      "from LATEST[/yellow]")


def _follow(job: str, run: Path, preempt: bool) -> bool:
    """Print the job's status lines until it completes; with `preempt`, send the signal once after a status line
    while it runs. Whether the signal was sent."""
    from slurm.submit import sacct

    log = run / "slurm" / job / f"{job}_0_log.out"
    seen, signalled, deadline = 0, False, time.time() + 3600
    while True:
        state = sacct([job]).get(job, {}).get("state", "PENDING")
        lines = log.read_text().splitlines() if log.is_file() else []
        for line in lines[seen:]:
            if line.startswith(STATUS):
                print("   " + line)
            if preempt and not signalled and line.startswith("[train]") and state.split()[0] == "RUNNING":
                console.print("   [yellow]sending the preemption signal (scancel --signal=USR2) on purpose...[/yellow]")
                if subprocess.run(["scancel", "--signal=USR2", job], capture_output=True).returncode == 0:
                    write_text_atomic(run / "demo-state", "preempted once\n")
                    signalled = True
        seen = len(lines)
        if state == "COMPLETED":
            return signalled
        if state.split()[0] in FINAL_FAILURES or time.time() > deadline:
            for line in log.read_text().splitlines()[seen:] if log.is_file() else []:
                print("   " + line)  # its last lines (a save on cancel) before the error
            raise RuntimeError(f"training job {job} ended {state}: see `adm jobs logs {job} --run-dir {run}`")
        time.sleep(1)


def evaluate(diff_run: Path, ref: Path, ref2: Path, settings_small: list, settings_large: list, cascade: list):
    """Through the farm: unguided on every snapshot; guidance and the cascade on the last two."""
    from eval.schedule import LocalBackend, find_snapshots, schedule_pass

    backend = LocalBackend(progress=True)
    if slurm_answers():
        from slurm.eval_jobs import SlurmBackend
        backend = SlurmBackend(minutes=30, gpus_per_task=0, cpus_per_task=1)
        console.print("   [cyan]a Slurm cluster answers: the farm submits job arrays there[/cyan]")
    snaps = find_snapshots(diff_run)
    plan = [(settings_small, ref, snaps), (settings_large, ref, snaps[-2:]), (cascade, ref2, snaps[-2:])]
    deadline = time.time() + 3600
    while True:
        counts = {"done": 0, "started": 0, "running": 0, "retrying": 0, "failed": 0}
        for settings, r, only in plan:
            c = schedule_pass(diff_run, settings, r, backend, only=only, log=lambda m: console.print("   " + m))
            counts = {k: counts[k] + c[k] + (c["refused"] if k == "failed" else 0) for k in counts}
        if counts["running"] + counts["started"] + counts["retrying"] == 0 or time.time() > deadline:
            return counts
        time.sleep(5)


def check_options(args) -> list[float]:
    """The demo's options, checked up front; returns the two guidance scales."""
    from models.respace import space_timesteps

    if args.resolution < 8 or args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution}: a multiple of 8 (the demo's UNet halves it twice)")
    import math

    # each at least one global batch of its training (64, 64, 32 images): the trainer refused less only after
    # the stages before it had run, minutes in
    for flag, value, batch in (("--kimg", args.kimg, 64), ("--classifier-kimg", args.classifier_kimg, 64),
                               ("--upsampler-kimg", args.upsampler_kimg, 32)):
        if not (math.isfinite(value) and value * 1000 >= batch):
            raise ValueError(f"{flag} {value}: at least {batch / 1000:g} (one global batch of {batch} images), "
                             "and finite")
    if args.upsampler_patch and not (0 < args.upsampler_patch < 2 * args.resolution and args.upsampler_patch % 4 == 0):
        raise ValueError(f"--upsampler-patch {args.upsampler_patch}: 0 (whole images) or a multiple of 4 (the "
                         f"upsampler's UNet halves it twice) under the upsampler's resolution {2 * args.resolution}")
    if args.snapshots < 2:
        raise ValueError(f"--snapshots {args.snapshots}: at least 2 (the report compares snapshots)")
    if args.samples < 4:
        raise ValueError(f"--samples {args.samples}: at least 4 (precision/recall uses 3 nearest neighbours)")
    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        scales = []
    if len(scales) != 2:
        raise ValueError(f"--scales {args.scales!r}: two classifier-guidance scales, e.g. 1,4")
    space_timesteps(1000, args.steps)  # a clear error for a step count that does not fit
    return scales


def main(argv: list[str] | None = None, prog: str = "adm demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="where everything goes")
    parser.add_argument("--resolution", type=int, default=16, help="base resolution (the upsampler doubles it)")
    parser.add_argument("--kimg", type=float, default=32.0, help="thousands of images to train the diffusion model")
    parser.add_argument("--snapshots", type=int, default=3, help="snapshots of the diffusion model (evaluated)")
    parser.add_argument("--samples", type=int, default=100, help="samples per evaluation")
    parser.add_argument("--classifier-kimg", type=float, default=24.0,
                        help="thousands of images to train the noisy classifier (for guidance)")
    parser.add_argument("--upsampler-kimg", type=float, default=12.0,
                        help="thousands of images to train the upsampler")
    parser.add_argument("--upsampler-patch", type=int, default=16,
                        help="the upsampler trains on random patches of this side (0: whole images)")
    parser.add_argument("--scales", default="1,4", help="two classifier-guidance scales")
    parser.add_argument("--steps", default="50", help="sampling steps: 50 (ancestral), ddim25, ...")
    parser.add_argument("--until", choices=STAGES, default="report", help="stop after this stage")
    args = parser.parse_args(argv)
    scales = check_options(args)  # before the data stage: every mistake here would surface minutes later
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    res, res2 = args.resolution, 2 * args.resolution
    start = time.time()
    took = {}  # minutes per stage, for the summary

    def lap(stage: str) -> None:
        took[stage] = (time.time() - start) / 60 - sum(took.values())

    console.rule("[bold]ADM at scale: the demo")

    console.print("[bold]1. Data[/bold]: scikit-learn's real handwritten digits in ImageNet's layout -> shards")
    if not (out / "digits" / "LOC_val_solution.csv").is_file():
        make_digits(out / "digits", res2)
    shards = {}
    for size in (res, res2):
        for split in ("train", "val"):
            shards[split, size] = out / "shards" / f"{split}{size}"
            if not (shards[split, size] / "manifest.json").is_file():
                wrote = adm("data", "write", str(out / "digits"), str(shards[split, size]), "--layout", "imagenet",
                            "--split", split, "--shard-size", "64", "--preprocess", f"center-crop:{size}",
                            "--image-format", "npy", "--workers", "2", "--quiet", capture=True)
                for line in (wrote.stderr + wrote.stdout).splitlines():  # (what it read, then what it wrote)
                    print("   " + line)
    info = json.loads(adm("data", "info", str(shards["train", res]), "--json", capture=True).stdout)
    console.print(f"   {info['samples']} training images in {info['shards']} shards, {info['classes']} classes, "
                  f"at {res}x{res} and {res2}x{res2}")
    lap("data")
    if args.until == "data":
        return 0

    slurm = slurm_answers()
    import torch

    from trainer.config import resolve_precision
    precision = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    ranks = 2 if slurm else local_ranks()
    console.print(f"[bold]2. Training[/bold] (DeepSpeed ZeRO-2, {ranks} process{'es' if ranks > 1 else ''}, {precision}"
                  f"{', as Slurm jobs: a Slurm cluster answers' if slurm else ''})")
    common = ["zero_stage=2", "num_slots=4", "data_workers=1"]
    diff_run = out / "runs" / "diffusion"
    every = args.kimg / args.snapshots
    # 64 channels: at 32, ADM's GroupNorm32 has one channel per group, which removes the per-channel means the
    # model must reproduce, and grey digits came out with colour casts (channel-mean spread 18/255 vs 2.5 at 24 kimg).
    # Channel multipliers 1,1,2 rather than the preset's 1,2,2: 64 channels at 8x8 instead of 128, 1.8x faster.
    # Four status lines per snapshot: they are also the points of the report's training-loss curve (12 by default).
    train(["preset=tiny-32", f"model.image_size={res}", "model.model_channels=64", "model.channel_mult=[1,1,2]",
           f"data={shards['train', res]}",
           f"run_dir={diff_run}",
           f"total_kimg={args.kimg}", "batch=64", "lr=2e-3", "ema_rates=[0.995]", f"status_kimg={every / 4:g}",
           f"snapshot_kimg={every:g}", f"checkpoint_kimg={every:g}", *common], diff_run,
          f"the diffusion model: {args.kimg:g} kimg, a snapshot every {every:g} kimg", preempt=True, slurm=slurm)
    lap("diffusion")
    clf_run = out / "runs" / "classifier"
    # trained on the larger crops, as ADM's classifier crops from the full image: its random-resized crop scales
    # the short side to between res and res/0.8, down from 2 res rather than up from res
    train(["preset=tiny-classifier-32", f"model.image_size={res}", "model.num_classes=10",
           f"data={shards['train', res2]}", f"val_data={shards['val', res]}", f"run_dir={clf_run}",
           f"total_kimg={args.classifier_kimg}", "batch=64", "lr=1e-3", "ema_rates=[0.95]",
           f"status_kimg={args.classifier_kimg}",
           f"snapshot_kimg={args.classifier_kimg}", f"checkpoint_kimg={args.classifier_kimg}", *common],
          clf_run, f"the noisy classifier: {args.classifier_kimg:g} kimg", slurm=slurm)
    lap("classifier")
    up_run = out / "runs" / "upsampler"
    # 64 channels at the top level, for the reason above: with 32 (one per group) the output's GroupNorm cannot
    # carry an image's channel means, and grey digits came out tinted (mean channel-mean spread 20.5/255 against
    # 2.8; area-downsampled back, 33 levels from the input against 17.5), for 1.8x the training time.
    # On random 16x16 patches (8x8 low-resolution inputs) rather than whole 32x32 images: 3.2x faster (116.6 against
    # 36.3 images/s on a 2-core AVX2 machine) and better, not worse: on the last snapshot's cascade FID 205.6 against
    # 229.2, round trip 0.031 against 0.054, tint 0.6 against 3.1, and clean black backgrounds where whole images left
    # tinted noise (8x8 patches: 231 images/s, but FID 262.2).
    # The cosine noise schedule (the base model's), not ADM's linear one for its upsamplers: 100 held-out 16x16 digits
    # upsampled scored FID 94.8 with it against the 200 held-out 32x32 ones, 161.9 with the linear one, which left grey
    # backgrounds (precision/recall 0.40/0.59 against 0.03/0.025), at the same cost; with training seed 1, 112.7 and
    # 110.4: the seed matters as much at this budget; the cosine schedule was about as good with one seed and far
    # better with the other.
    train(["preset=tiny-upsampler-32-64", f"model.image_size={res2}", f"model.small_size={res}",
           "model.channel_mult=[2,2,2]", "diffusion.noise_schedule=cosine",
           f"data={shards['train', res2]}", f"run_dir={up_run}", f"total_kimg={args.upsampler_kimg}",
           f"patch_size={args.upsampler_patch}",
           "batch=32", "lr=1e-3", "ema_rates=[0.98]", f"status_kimg={args.upsampler_kimg}",
           f"snapshot_kimg={args.upsampler_kimg}", f"checkpoint_kimg={args.upsampler_kimg}", *common],
          up_run, f"the upsampler {res}->{res2}: {args.upsampler_kimg:g} kimg", slurm=slurm)
    lap("upsampler")
    if args.until == "train":
        return 0

    # bf16 sampling where the device computes bf16 natively, as training: 1.65x faster on a 2-core AVX512-BF16
    # machine, FID 98.3 vs 97.8 in fp32 on the demo's last snapshot
    sampling = "bf16" if precision == "bf16" else "fp32"
    console.print(f"[bold]3. Evaluation[/bold] through the farm, against the held-out digits (real FID Inception; "
                  f"sampling in {sampling})")
    from eval.cli import main as adm_eval
    from eval.schedule import find_snapshots
    from eval.settings import EvalSetting

    refs = {}
    for size in (res, res2):
        refs[size] = out / "eval" / f"heldout{size}.npz"
        if not refs[size].is_file():  # `adm eval ref`, in this process: the Inception network stays loaded for step 3
            with contextlib.redirect_stdout(io.StringIO()):
                adm_eval(["ref", str(shards["val", size]), "--out", str(refs[size]), "--resolution", str(size),
                          "--pr-num", "200"])
    lap("references")
    clf_snap = str(find_snapshots_any(clf_run)[-1])
    up_snap = str(find_snapshots_any(up_run)[-1])
    n = args.samples
    common_s = dict(steps=args.steps, num=n, shard_size=n, batch_size=n, precision=sampling)
    unguided = [EvalSetting(name="unguided", **common_s)]
    guided = [EvalSetting(name=f"guided-s{s:g}", scale=s, classifier=clf_snap, **common_s) for s in scales]
    cascade = [EvalSetting(name=f"cascade-{res2}", upsampler=up_snap, upsampler_steps="25", **common_s)]
    counts = evaluate(diff_run, refs[res], refs[res2], unguided, guided, cascade)
    from eval import registry
    for r in registry.results(diff_run):
        m = r["metrics"]
        console.print(f"   {r['snapshot_name']} {r['setting']['name']:<14} FID {m['fid']:7.2f}  sFID {m['sfid']:7.2f}"
                      f"  precision {m['precision']:.3f}  recall {m['recall']:.3f}")
    if counts["failed"]:
        console.print(f"   [red]{counts['failed']} evaluation(s) failed: see {diff_run / 'eval'}[/red]")
    lap("evaluation")
    if args.until == "eval":
        return 0 if counts["failed"] == 0 else 1

    console.print("[bold]4. Report[/bold]")
    from eval.report import write_report
    procs = "two processes" if ranks == 2 else "one process on the GPU"
    state = diff_run / "demo-state"
    preempted = ("it was interrupted once by the preemption signal, saved, and resumed exactly where it stopped"
                 if state.is_file() and "preempted" in state.read_text() else
                 "this time it was not interrupted on purpose (an earlier, interrupted demo's job trained it)")
    patches = f", on random {args.upsampler_patch}x{args.upsampler_patch} patches" if args.upsampler_patch else ""
    intro = INTRO.format(res=res, res2=res2, kimg=args.kimg, n=n, steps=args.steps, patches=patches, procs=procs,
                         preempted=preempted, up_kimg=args.upsampler_kimg, scales=" and ".join(f"{s:g}" for s in scales))
    report = write_report(diff_run, out, intro=intro, commands=CLUSTER_COMMANDS)
    lap("report")
    console.rule()
    console.print(f"Done in {time.time() - start:.0f} s ({', '.join(f'{k} {v:.1f}' for k, v in took.items())} "
                  f"minutes). Open [bold]{report}[/bold]")
    console.print(f"   shards: {out / 'shards'}   runs: {out / 'runs'}   evaluations: {diff_run / 'eval'}")
    return 0 if counts["failed"] == 0 else 1


def find_snapshots_any(run: Path) -> list[Path]:
    snaps = sorted(p for p in (run / "snapshots").iterdir() if (p / "manifest.json").is_file())
    if not snaps:
        raise RuntimeError(f"{run}: training produced no snapshot")
    return snaps


if __name__ == "__main__":
    from adm.cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:], "python -m adm.demo"))
