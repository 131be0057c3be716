"""`adm sample SNAPSHOT --num N --seed-start S --out DIR`: sample shards in ADM's npz format.

Image i is a function of (snapshot, seed S + i, settings) only, so any split of the work over
machines and batch sizes gives the same set. Labels are drawn per seed in a fixed random order (never
sorted: Inception Score depends on order). Shards `samples-<first>-<last>.npz` (arr_0 uint8 NHWC,
arr_1 labels) are written atomically; finished shards are skipped, so a rerun resumes.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from adm.config import check_device

from .atomic import merge_npz_atomic, save_npz_atomic, write_text_atomic
from .inception import default_device
from .settings import EvalSetting
from .strict_fp32 import tf32


def quantize(images: torch.Tensor) -> np.ndarray:
    """ADM's sample scripts' convention: ((x + 1) * 127.5).clamp(0, 255).to(uint8), NHWC."""
    return ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def network_layout(device, arch: str = "unet") -> str:
    """The memory format a Sampler's network runs in on a device: channels-last for the diffusion models on a CPU
    (oneDNN's NHWC convolutions sample the demo's base model 1.05x and its upsampler 1.3x faster at batch 100 on
    a 2-core AVX2 EPYC; a classifier's guidance gradient runs slower so, 0.12 against 0.10 s a step), else
    contiguous (GPUs until measured there). The images depend on it to float rounding, so the farm records it."""
    return "channels_last" if torch.device(device).type == "cpu" and arch != "classifier" else "contiguous"


def load_model(path: str, device, weights: str = "ema"):
    from models.snapshot import load_snapshot

    snap = load_snapshot(path, hashes=True, weights=weights)  # a flipped bit would give plausible images
    model = snap.build(device)
    snap.state_dict = None  # the model holds the weights now: a second copy in host memory for the run helps none
    if network_layout(device, snap.config.arch) == "channels_last":
        model.to(memory_format=torch.channels_last)
    return model, snap


def _diffusion(snap, respacing: str):
    from models.adm_compat import diffusion_from_preset

    # what the snapshot records, else (written before predict_xstart was kept, or its section lost) what its
    # training options say, else ADM's (a converted released checkpoint)
    trained = snap.meta.get("training_options", {}).get("diffusion", {})
    d = dict(snap.meta.get("diffusion") or {})
    for key, default in (("steps", 1000), ("noise_schedule", "linear"), ("predict_xstart", False)):
        d.setdefault(key, trained.get(key, default))
    return diffusion_from_preset(d, snap.config.learn_sigma, respacing)


def shard_path(out: Path, seeds: list[int]) -> Path:
    return Path(out) / f"samples-{seeds[0]:08d}-{seeds[-1]:08d}.npz"


def batch_path(shard: Path, seeds: list[int]) -> Path:
    """Where a batch of a shard is kept until the shard is whole: hidden, so no reader takes it for a shard."""
    return shard.with_name(f".{shard.stem}.batch-{seeds[0]:08d}-{seeds[-1]:08d}.npz")


def kept_batches(out: Path) -> list[Path]:
    """The batches kept of shards not yet whole (batch_path), without a writer's temporary files."""
    return [p for p in Path(out).glob(".samples-*.batch-*.npz") if ".partial" not in p.name]


def finished_shard_problem(path: Path, count: int) -> str | None:
    """Why a finished-looking shard cannot be reused (damaged after it was written: cut short by a full disk's
    copy, overwritten, a flipped bit), from its zip directory, its arrays' headers and every member read
    through once against its CRC (a chunk at a time); None when it is sound."""
    from .npzfile import open_npz, stored_header

    try:
        with open_npz(path) as data:
            if "arr_0" not in data.files:
                return "damaged (no arr_0)"
            shape, dtype = stored_header(data, "arr_0")
            labels = stored_header(data, "arr_1")[0] if "arr_1" in data.files else None
            bad = data.zip.testzip()
    except Exception as e:  # noqa: BLE001 - a damaged archive fails in many ways; all mean "sample again"
        return f"damaged ({str(e).removeprefix(f'{path}: ')})"
    if bad is not None:
        return f"damaged ({bad}: its bytes do not match their CRC)"
    if len(shape) != 4 or shape[0] != count or shape[3] != 3 or dtype != np.uint8:
        return f"damaged (arr_0 is {dtype} {shape}, expected {count} uint8 images)"
    if labels is not None and labels != (count,):
        return f"damaged (arr_1 has shape {labels}, expected {count} labels)"
    return None


def finished_shards(out: Path) -> list[Path]:
    """The shards of a directory, without a writer's temporary files (a killed write leaves
    samples-….npz.partial-<host>-<pid>-<id>.npz)."""
    return [p for p in Path(out).glob("samples-*.npz") if ".partial" not in p.name]


def shard_seed_range(path: Path) -> tuple[int, int] | None:
    """(first, last) seed of a `samples-<first>-<last>.npz` shard; None for other names."""
    parts = Path(path).name.removesuffix(".npz").split("-")
    if len(parts) != 3 or parts[0] != "samples" or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return int(parts[1]), int(parts[2])


def overlapping_shards(paths: list[Path]) -> tuple[Path, Path] | None:
    """Two shards whose seed ranges overlap (one directory filled with two --shard-size or --seed-start
    splits), or None: counting both would count those images twice."""
    ranged = sorted((r, p) for p in paths if (r := shard_seed_range(p)) is not None)
    for (r0, p0), (r1, p1) in zip(ranged, ranged[1:]):
        if r1[0] <= r0[1]:
            return p0, p1
    return None


class ProgressiveFrames:
    """DDPM's progressive decoding, watched during a batch's own sampling (sample_images' on_step): the
    predicted x_0 of the batch's first `n` samples at `frames` evenly spaced steps of `steps`; the last
    frame is the sample itself. Only the picked steps are kept."""

    def __init__(self, n: int, steps: int, frames: int = 8):
        self.n, self.steps, self.seen = n, steps, 0
        self.picks = set(np.linspace(0, steps - 1, frames).round().astype(int).tolist())
        self.kept: list[np.ndarray] = []

    def __call__(self, out: dict) -> None:
        if self.seen in self.picks:
            x = out["sample"] if self.seen == self.steps - 1 else out["pred_xstart"]
            self.kept.append(quantize(x[:self.n].float()))
        self.seen += 1

    def array(self) -> np.ndarray:
        """(frames, n, H, W, 3) uint8."""
        if self.seen != self.steps:
            raise RuntimeError(f"progressive decoding watched {self.seen} of {self.steps} steps")
        return np.stack(self.kept)


class Sampler:
    """A snapshot (plus optional classifier and upsampler) loaded once, sampling any seed range."""

    def __init__(self, snapshot: str, setting: EvalSetting, device=None, base=None):
        self.setting, self.base = setting, base
        self.device = torch.device(device or default_device())
        self.use_ddim = setting.steps.startswith("ddim")
        if base is not None:  # an upsampler on its own, reading the base images (eval.base_samples)
            self.up, self.up_snap = load_model(snapshot, self.device, setting.weights)
            if self.up_snap.config.arch != "upsampler":
                raise ValueError(f"{snapshot}: a {self.up_snap.config.arch} snapshot; --base-samples are "
                                 "upsampled by an upsampler snapshot")
            self.model, self.snap, self.cond_fn, self.num_classes = None, self.up_snap, None, None
            self.diffusion = self.up_diffusion = _diffusion(self.up_snap, setting.steps)
            return
        self.model, self.snap = load_model(snapshot, self.device, setting.weights)
        cfg = self.snap.config
        if cfg.arch != "unet":
            raise ValueError(f"{snapshot}: a {cfg.arch} snapshot; sampling starts from a diffusion model (unet)")
        self.diffusion = _diffusion(self.snap, setting.steps)
        self.cond_fn, self.num_classes = None, cfg.num_classes
        if setting.classifier and setting.scale:
            from models.guidance import classifier_cond_fn

            clf, clf_snap = load_model(setting.classifier, self.device)
            if clf_snap.config.arch != "classifier":
                raise ValueError(f"{setting.classifier}: a {clf_snap.config.arch} snapshot, expected a classifier")
            self.cond_fn = classifier_cond_fn(clf, setting.scale)
            self.num_classes = self.num_classes or clf_snap.config.num_classes
        self.up = None
        if setting.upsampler:
            self.up, self.up_snap = load_model(setting.upsampler, self.device)
            if self.up_snap.config.arch != "upsampler":
                raise ValueError(f"{setting.upsampler}: a {self.up_snap.config.arch} snapshot, expected an upsampler")
            self.up_diffusion = _diffusion(self.up_snap, setting.upsampler_steps)
        from .preflight import check_guidance_noise, check_stack

        if self.cond_fn:
            check_guidance_noise(self.snap.meta, clf_snap.meta, (snapshot, setting.classifier))
        check_stack(cfg, clf_snap.config if self.cond_fn else None, self.up_snap.config if self.up else None,
                      (snapshot, setting.classifier, setting.upsampler))

    @property
    def resolution(self) -> int:
        return self.up_snap.config.image_size if self.up is not None else self.snap.config.image_size

    def autocast(self):
        """The networks' arithmetic the setting asks for: bf16 autocast (the diffusion arithmetic between them
        stays float32: bf16 outputs times float32 coefficients promote), TF32 or true float32 on a GPU (PyTorch's
        default lets cuDNN convolutions use TF32, which would pass TF32 off as fp32)."""
        if self.setting.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return tf32(self.setting.precision == "tf32")

    def batch(self, seeds: list[int], watch: ProgressiveFrames | None = None,
              base=None) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 NHWC images and their labels (None for an unconditional, unguided model). `base`: a cascade's
        base images of these seeds, sampled before (eval.base_samples.BaseSamples): only the upsampler runs."""
        with self.autocast():
            return self._batch(seeds, watch, base)

    def _batch(self, seeds: list[int], watch: ProgressiveFrames | None = None,
               base=None) -> tuple[np.ndarray, np.ndarray | None]:
        from models.sampling import draw_labels, sample_cascade, sample_images, upsample, upsampler_noise

        base = base if base is not None else self.base
        if base is not None:  # the upsampler's noise as in a cascade: the same seeds give the same images
            if self.model is not None and self.up is None:
                raise ValueError("base images are upsampled by a cascade's or an upsampler's Sampler")
            low, y = base.take(seeds)
            ddim = self.use_ddim if self.model is None else self.setting.upsampler_steps.startswith("ddim")
            x = upsample(self.up, self.up_diffusion, low, self.resolution, upsampler_noise(seeds, self.device),
                         labels=y, use_ddim=ddim, device=self.device)
            return quantize(x), y
        y = draw_labels(seeds, self.num_classes, self.device) if self.num_classes else None
        if self.up is not None:
            x, _, _ = sample_cascade(self.model, self.diffusion, self.up, self.up_diffusion, seeds,
                                     base_size=self.snap.config.image_size, large_size=self.resolution, labels=y,
                                     cond_fn=self.cond_fn, use_ddim=self.use_ddim, device=self.device, on_step=watch,
                                     upsampler_ddim=self.setting.upsampler_steps.startswith("ddim"))
        else:
            x, _ = sample_images(self.model, self.diffusion, seeds, self.snap.config.image_size, labels=y,
                                 cond_fn=self.cond_fn, use_ddim=self.use_ddim, device=self.device, on_step=watch)
        return quantize(x), (y.cpu().numpy() if y is not None else None)

    def watcher(self, n: int = 4, frames: int = 8) -> ProgressiveFrames:
        """A progressive decoding of a batch's first n samples (of the base model, in a cascade)."""
        return ProgressiveFrames(n, self.diffusion.num_timesteps, frames)

    def watch_base(self, seeds: list[int], watch: ProgressiveFrames) -> None:
        """The base model's steps alone on these seeds, watched (a cascade's upsampler adds no frame)."""
        from models.sampling import draw_labels, sample_images

        with self.autocast():
            y = draw_labels(seeds, self.num_classes, self.device) if self.num_classes else None
            sample_images(self.model, self.diffusion, seeds, self.snap.config.image_size, labels=y,
                          cond_fn=self.cond_fn, use_ddim=self.use_ddim, device=self.device, on_step=watch)

    def shard(self, seeds: list[int], out: Path, bar=None, watch: ProgressiveFrames | None = None,
              base=None) -> Path:
        """Sample one shard (skipped when it exists: resumable); `watch` watches its first batch; `base`: a
        cascade's base images of these seeds, sampled before (see batch)."""
        path = shard_path(out, seeds)
        if path.is_file():
            problem = finished_shard_problem(path, len(seeds))
            if problem is None:
                if bar is not None:
                    bar.update(len(seeds))
                return path
            print(f"{path}: {problem}; sampling it again", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
        Path(out).mkdir(parents=True, exist_ok=True)
        images, labels = [], []
        for i in range(0, len(seeds), self.setting.batch_size):
            chunk = seeds[i:i + self.setting.batch_size]
            # each batch kept until its shard is whole: a task stopped (its time limit, a preemption, a crash)
            # samples again only the batch it was on (a shard of ADM-256 at 250 steps takes hours)
            part = batch_path(path, chunk)
            if part.is_file() and finished_shard_problem(part, len(chunk)) is None:
                with np.load(part) as saved:
                    x, y = saved["arr_0"], (saved["arr_1"] if "arr_1" in saved.files else None)
            else:
                x, y = self.batch(chunk, watch if i == 0 else None, base)
                save_npz_atomic(part, arr_0=x, **({"arr_1": y} if y is not None else {}))
            images.append(x)
            labels.append(y)
            if bar is not None:
                bar.update(len(x))
        # ADM's sample files: arr_1 (labels) only when there are labels, as its image_sample.py writes them
        save_npz_atomic(path, arr_0=np.concatenate(images),
                        **({"arr_1": np.concatenate(labels)} if labels[0] is not None else {}))
        for part in kept_batches(path.parent):  # (and those of another batch size; a writer's temporary file is
            if part.name.startswith(f".{path.stem}.batch-"):  # its own to remove)
                part.unlink(missing_ok=True)
        return path

    def progressive(self, seeds: list[int], frames: int = 8) -> np.ndarray:
        """DDPM's progressive decoding of these seeds on their own: (frames, N, H, W, 3) uint8, the predicted
        x_0 at evenly spaced steps, the last frame the sample itself. The farm records it while sampling
        a shard instead (Sampler.shard's watch), which costs nothing extra."""
        watch = self.watcher(len(seeds), frames)
        self.batch(seeds, watch)
        return watch.array()


def claim_out_dir(out: Path, snapshot: str, setting: EvalSetting, write: bool = True,
                  base_samples: str | None = None, device=None) -> None:
    """An --out directory holds the samples of one snapshot and setting (recorded in sampling.json), so
    that its finished shards can be reused; another snapshot or setting there is refused, naming what
    differs, instead of passing old shards off as new ones. So is another kind of `device` (a GPU's generators
    draw other noise than a CPU's from the same seeds; records from before it was kept pass).
    `write=False` only checks (nothing created)."""
    from .settings import _digest

    record = {"snapshot": str(Path(snapshot).resolve()), "snapshot_digest": _digest(snapshot),
              "classifier_digest": _digest(setting.classifier), "upsampler_digest": _digest(setting.upsampler),
              **({"base_samples": str(Path(base_samples).resolve()), "base_samples_digest": _digest(base_samples)}
                 if base_samples else {}),
              **{k: getattr(setting, k) for k in ("steps", "classifier", "scale", "upsampler", "upsampler_steps",
                                                 "weights", "precision")},
              **({"device": torch.device(device).type} if device is not None else {})}
    path = out / "sampling.json"
    sampled = finished_shards(out) or kept_batches(out)  # (a stopped shard's batches are reused as its samples)
    if path.is_file() and sampled:  # (no shard yet: nothing to protect, claimed anew)
        old = json.loads(path.read_text())
        # the models count by their digests: the same one by another path (relative, a link) is the same
        changed = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in record.items()
                   if old.get(k) != v and k not in ("snapshot", "classifier", "upsampler", "base_samples")
                   and (k in old or k != "device")]
        if changed:
            raise ValueError(f"--out {out} holds samples of another snapshot or setting ({'; '.join(changed)}); "
                             "give another --out")
        return
    if out.is_dir() and sampled:
        raise ValueError(f"--out {out} holds samples without a sampling.json (of what, unknown); give another --out")
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def _check_snapshot_steps(a) -> None:
    """--steps and --upsampler-steps against their snapshots' diffusions, naming the option (its default,
    250, is more steps than a short diffusion has)."""
    from models.snapshot import read_config, verify_snapshot

    from .preflight import check_steps

    for path, spec, flag in ((a.snapshot, a.steps, "--steps"), (a.upsampler, a.upsampler_steps, "--upsampler-steps")):
        if path:
            verify_snapshot(path)
            check_steps(spec, read_config(path), flag, " (the default)" if spec == "250" else "")


def main(argv=None, prog="adm sample") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("snapshot", help="a snapshot directory of a diffusion run (or a converted ADM checkpoint)")
    p.add_argument("--num", type=int, required=True, help="images to sample")
    p.add_argument("--seed-start", type=int, default=0,
                   help="seed index of the first image (image i uses seed start+i)")
    p.add_argument("--out", required=True, help="directory for the npz shards (finished shards are kept on a re-run)")
    p.add_argument("--steps", default="250", help="timestep respacing: 250 (ancestral), ddim25 (DDIM), ...")
    p.add_argument("--classifier", help="noisy classifier snapshot for guidance")
    p.add_argument("--scale", type=float, default=None, help="classifier guidance scale (default 1 with --classifier)")
    p.add_argument("--upsampler", help="upsampler snapshot: sample the cascade")
    p.add_argument("--upsampler-steps", default="250", help="the upsampler's timestep respacing, as --steps")
    p.add_argument("--base-samples", metavar="NPZ", help="SNAPSHOT is an upsampler: upsample these images (arr_0, "
                   "labels in arr_1), row i with seed i, as ADM's super_res_sample.py; --steps are the upsampler's")
    p.add_argument("--weights", default="ema", help="ema (the snapshot's main weights: its first EMA; a classifier's "
                   "raw weights), raw, ema_<rate>, phema_<s>")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                   help="sampling arithmetic: fp32 (true float32), tf32 (a GPU's TF32 convolutions and matmuls; fp32 "
                   "on a CPU), bf16 (autocast)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (changes no image)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per npz shard")
    p.add_argument("--merge", action="store_true", help="also write DIR/samples.npz with every image, in seed order")
    p.add_argument("--device", help="default: this process's GPU (by its local rank) if there is one, else cpu")
    a = p.parse_args(argv)
    if a.num < 1:
        raise ValueError(f"--num must be positive, got {a.num}")
    if a.seed_start < 0:
        raise ValueError(f"--seed-start must be 0 or more, got {a.seed_start}")
    if a.scale is not None and not a.classifier:
        raise ValueError("--scale is the classifier-guidance scale: give the classifier with --classifier SNAPSHOT")
    if a.shard_size < 1 or a.batch_size < 1:
        raise ValueError(f"--shard-size and --batch-size must be positive, got {a.shard_size} and {a.batch_size}")
    if a.upsampler_steps != "250" and not a.upsampler:
        raise ValueError(f"--upsampler-steps {a.upsampler_steps}: give the upsampler with --upsampler SNAPSHOT")
    if a.base_samples and (a.classifier or a.upsampler):
        raise ValueError(f"--base-samples {a.base_samples}: SNAPSHOT is the upsampler that reads them; "
                         "--classifier and --upsampler belong to a cascade from a base model")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file; expected a directory (new, or one this command filled before)")
    theirs = [n for n in ("manifest.json", "config.json", "training_options.json") if (out / n).is_file()]
    if theirs:  # a snapshot's, a dataset's or a run's directory: samples would be mixed into it
        raise ValueError(f"--out {out}: holds {theirs[0]} (a snapshot, dataset or run directory); give a directory "
                         "of its own for the samples")
    scale = 1.0 if a.scale is None else a.scale
    setting = EvalSetting(name="cli", steps=a.steps, scale=scale if a.classifier else 0.0, classifier=a.classifier,
                          upsampler=a.upsampler, upsampler_steps=a.upsampler_steps, weights=a.weights,
                          num=max(a.num, 2), seed_start=a.seed_start, shard_size=a.shard_size,
                          batch_size=a.batch_size, precision=a.precision)
    setting.num = a.num
    if a.device:
        check_device(a.device)
    device = torch.device(a.device or default_device())
    _check_snapshot_steps(a)
    base = None
    if a.base_samples:
        from models.snapshot import read_config

        from .base_samples import BaseSamples

        cfg = read_config(a.snapshot).get("model", {})
        if cfg.get("arch") != "upsampler":
            raise ValueError(f"{a.snapshot}: a {cfg.get('arch', 'unet')} snapshot; --base-samples are upsampled "
                             "by an upsampler snapshot")
        base = BaseSamples(a.base_samples, cfg["small_size"], cfg.get("num_classes"), a.seed_start, a.num)
    claim_out_dir(out, a.snapshot, setting, write=False, base_samples=a.base_samples,
                  device=device)  # the cheap checks first
    from adm.progress import progress

    planned = [shard_path(out, setting.shard_seeds(i)) for i in range(setting.num_shards)]
    there = set(finished_shards(out))
    clash = overlapping_shards(sorted(set(planned) | there))
    if clash:
        old, new = (clash if clash[0] in there and clash[0] not in planned else clash[::-1])
        (a0, a1), (b0, b1) = shard_seed_range(old), shard_seed_range(new)
        after = any(shard_seed_range(q)[0] == a1 + 1 for q in there)  # another part's shards follow it
        if old in there and new in planned and a0 == b0 and a1 < b1 and not after:  # the same split, extended
            raise ValueError(f"--out {out}: {old.name} is the short last shard of a smaller --num there; delete "
                             "it to sample the larger --num (its seeds are sampled again, identically)")
        if old in there and new == planned[-1] and a0 == b0 and a1 > b1:  # the same split, cut short: fewer seeds
            raise ValueError(f"--out {out}: {old.name} there goes past this --num's last shard {new.name}: the "
                             f"directory holds a larger --num's samples; sample into another --out (or take the "
                             f"first {a.num} of its samples.npz)")
        raise ValueError(f"--out {out}: {clash[0].name} (there or planned) and {clash[1].name} share seeds: the "
                         "directory was filled with another --shard-size or --seed-start split; give the same "
                         "split again or another --out (parts of one --out line up when each --seed-start is a "
                         "multiple of --shard-size and each --num but the last one too)")
    sampler = Sampler(a.snapshot, setting, device, base=base)
    claim_out_dir(out, a.snapshot, setting, base_samples=a.base_samples, device=device)
    bar = progress(total=a.num, unit="img", desc="sampling")
    paths = [sampler.shard(setting.shard_seeds(i), out, bar) for i in range(setting.num_shards)]
    bar.close()
    print(f"{a.num} samples in {len(paths)} shard(s) under {out}")
    if a.merge:
        merge_out_dir(out)
    return 0


def merge_out_dir(out: Path) -> None:
    """samples.npz: every shard of the directory in seed order (this command's and those of other parts of a
    --seed-start split sampled into it), saying which seeds it holds, and any gap between the parts."""
    from .features import sample_shards

    shards = sample_shards(out)
    labelled = all("arr_1" in np.load(pth).files for pth in shards)
    merge_npz_atomic(out / "samples.npz", shards, ("arr_0", "arr_1") if labelled else ("arr_0",))
    spans: list[list[int]] = []
    for first, last in filter(None, map(shard_seed_range, shards)):  # (another name in the folder holds no seeds)
        if spans and spans[-1][1] + 1 == first:
            spans[-1][1] = last
        else:
            spans.append([first, last])
    held = ", ".join(f"{a}-{b}" for a, b in spans)
    count = sum(b - a + 1 for a, b in spans)
    gaps = ", ".join(f"{a[1] + 1}-{b[0] - 1}" for a, b in zip(spans, spans[1:]))
    print(f"{out / 'samples.npz'}: {count} images, seeds {held}"
          + (f" (seeds {gaps} missing: sample them into {out}, then --merge again)" if gaps else ""))


if __name__ == "__main__":
    from adm.cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:], "python -m eval.sample"))
