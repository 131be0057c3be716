"""`adm demo`: the whole system on this machine, on real data, in a few minutes.

1. Data: the 1,797 handwritten digits scikit-learn ships (and its two photographs), written in
   ImageNet's folder layout with a LOC_val_solution.csv validation split, converted to WebDataset
   shards by `adm data write` (the ImageNet code path).
2. Training through the real trainer (DeepSpeed ZeRO-2, 2 local processes, gloo on CPU): a tiny
   class-conditional ADM, interrupted once on purpose by the preemption signal and resumed, and a
   noisy classifier.
3. Evaluation: samples from two snapshots (unguided and guided), FID / sFID / precision / recall
   against held-out digits with the real Inception weights.
4. A report (report.html) with the loss curve, sample grids and the metrics.
Re-running reuses what is done.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(width=110)


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
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")


def train_with_one_preemption(args: list[str], run: Path) -> bool:
    """Start training, send the preemption signal after the first status line, then resume."""
    state = run / "demo-state"
    if state.is_file() and "DONE" in state.read_text():
        return False
    proc = subprocess.Popen([sys.executable, "-m", "adm", "train", *args], stdout=subprocess.PIPE, text=True)
    interrupted = False
    for line in proc.stdout:
        print("   " + line.rstrip())
        if line.startswith("[train]") and not interrupted and not (run / "demo-state").is_file():
            console.print("   [yellow]sending the preemption signal (SIGUSR2) on purpose...[/yellow]")
            proc.send_signal(signal.SIGUSR2)
            interrupted = True
    code = proc.wait()
    if code == 75:
        (run / "demo-state").write_text("preempted once\n")
        console.print("   [yellow]the ranks saved together and exited (status 75): re-running the same command "
                      "resumes[/yellow]")
        adm("train", *args)
    elif code != 0:
        raise RuntimeError(f"training failed with status {code}")
    (run / "demo-state").write_text("DONE\n")
    return True


def main(argv: list[str] | None = None, prog: str = "adm demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="where everything goes")
    parser.add_argument("--kimg", type=float, default=8.0, help="thousands of images to train the diffusion model")
    parser.add_argument("--samples", type=int, default=100, help="samples per evaluated snapshot")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    console.rule("[bold]ADM at scale: the demo")

    console.print("[bold]1. Data[/bold]: scikit-learn's real handwritten digits in ImageNet's layout -> shards")
    if not (out / "digits" / "LOC_val_solution.csv").is_file():
        make_digits(out / "digits", 32)
    for split in ("train", "val"):
        if not (out / "shards" / split / "manifest.json").is_file():
            adm("data", "write", str(out / "digits"), str(out / "shards" / split), "--layout", "imagenet",
                "--split", split, "--shard-size", "64", "--preprocess", "center-crop:32", "--image-format", "npy",
                "--workers", "2", "--quiet")
    info = json.loads(adm("data", "info", str(out / "shards" / "train"), "--json", capture=True).stdout)
    console.print(f"   {info['samples']} training images in {info['shards']} shards, {info['classes']} classes")

    console.print("[bold]2. Training[/bold] (DeepSpeed ZeRO-2, 2 processes, bf16 on CPU)")
    common = ["batch=32", "num_slots=4", "data_workers=1", "--nproc", "2"]
    diff_run = out / "runs" / "diffusion"
    half = args.kimg / 2
    train_with_one_preemption(
        [f"preset=tiny-32", f"data={out / 'shards' / 'train'}", f"run_dir={diff_run}", f"total_kimg={args.kimg}",
         f"status_kimg={args.kimg / 8:.3f}", f"snapshot_kimg={half}", f"checkpoint_kimg={half}", "lr=2e-4",
         "ema_rates=[0.99]", *common], diff_run)
    clf_run = out / "runs" / "classifier"
    if not (clf_run / "snapshots").is_dir():
        adm("train", "preset=tiny-classifier-32", f"data={out / 'shards' / 'train'}",
            f"val_data={out / 'shards' / 'val'}", f"run_dir={clf_run}", "total_kimg=1.5", "status_kimg=0.5",
            "snapshot_kimg=1.5", "lr=1e-3", "model.num_classes=10", *common)

    console.print("[bold]3. Evaluation[/bold]: samples vs held-out digits with the real FID Inception network")
    ref = out / "eval" / "heldout.npz"
    if not ref.is_file():
        import numpy as np
        from data_pipeline.loader import StreamLoader
        loader = StreamLoader(out / "shards" / "val", 32, 200, flip=False, num_slots=1)
        batch = next(iter(loader))
        images = ((batch["image"] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        ref.parent.mkdir(parents=True, exist_ok=True)
        np.savez(ref, arr_0=images, arr_1=batch["label"].numpy())
    snaps = sorted(p for p in (diff_run / "snapshots").iterdir() if "-" not in p.name)
    clf_snap = sorted((clf_run / "snapshots").iterdir())[-1]
    metrics = {}
    for snap in snaps[-2:]:
        for label, extra in (("unguided", []), ("guided x2", ["--classifier", str(clf_snap), "--scale", "2"])):
            key = f"{snap.name} {label}"
            target = out / "eval" / snap.name / label.replace(" ", "-")
            adm("sample", str(snap), "--num", str(args.samples), "--steps", "ddim25", "--out", str(target),
                "--merge", "--batch-size", "50", *extra, capture=True)
            if not (target / "metrics.json").is_file():
                adm("eval", "compare", str(ref), str(target / "samples.npz"), "--json", str(target / "metrics.json"),
                    capture=True)
            metrics[key] = json.loads((target / "metrics.json").read_text())
            m = metrics[key]
            console.print(f"   {key:<28} FID {m['fid']:7.2f}  sFID {m['sfid']:7.2f}  precision {m['precision']:.3f}"
                          f"  recall {m['recall']:.3f}")

    console.print("[bold]4. Report[/bold]")
    from adm.report import write_report
    report = write_report(out, diff_run, clf_run, metrics)
    console.rule()
    console.print(f"Done in {time.time() - start:.0f} s. Open [bold]{report}[/bold]")
    console.print(f"   shards: {out / 'shards'}   runs: {out / 'runs'}   samples and metrics: {out / 'eval'}")
    return 0
