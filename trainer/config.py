"""Training configuration: one typed dataclass, presets for every published model, YAML + overrides."""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

from models.config import ModelConfig
from models.presets import get_preset

from .power_ema import SIGMA_REL_MIN

TASKS = ("diffusion", "classifier", "upsampler")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NOISE_SCHEDULES = ("linear", "cosine")
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


@dataclass
class DiffusionConfig:
    steps: int = 1000  # T
    noise_schedule: str = "linear"  # linear | cosine
    schedule_sampler: str = "uniform"  # uniform | loss-second-moment
    use_kl: bool = False  # train on the (rescaled) VLB only
    rescale_learned_sigmas: bool = False  # lambda = 0.001 at any T (hybrid loss)
    predict_xstart: bool = False

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"diffusion.steps: need at least 1 step, got {self.steps}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"diffusion.noise_schedule: {self.noise_schedule!r} is not one of {', '.join(NOISE_SCHEDULES)}")
        if self.schedule_sampler not in SCHEDULE_SAMPLERS:
            raise ValueError(f"diffusion.schedule_sampler: {self.schedule_sampler!r} is not one of "
                             f"{', '.join(SCHEDULE_SAMPLERS)}")

    def for_sampling(self) -> dict:
        """What a snapshot records for sampling it (models.adm_compat.diffusion_from_preset reads it)."""
        return {"steps": self.steps, "noise_schedule": self.noise_schedule, "predict_xstart": self.predict_xstart}


# model fields a resume may change: neither alters a weight's shape or meaning (gradient checkpointing is a
# memory knob, dropout a regulariser: turning it on for a fine-tune is common)
CHANGEABLE_MODEL_FIELDS = ("use_checkpoint", "dropout")


@dataclass
class TrainConfig:
    task: str = "diffusion"  # diffusion | classifier | upsampler
    run_dir: str = "runs/default"  # checkpoints, snapshots, logs; re-running resumes from here
    data: str = ""  # WebDataset shard directory (adm data write)
    val_data: str = ""  # optional held-out shards (classifier validation accuracy)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    total_kimg: float = 10.0  # train until this many thousand images
    batch: int = 32  # global batch (images per optimizer step), fixed whatever the world size
    micro_batch: int = 0  # images per rank per forward; 0 = batch / world size
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_kimg: float = 0.0  # linear learning-rate warm-up
    lr_decay: bool = False  # linear decay to 0 at total_kimg (guided-diffusion's anneal_lr)
    grad_clip: float = 0.0  # max gradient norm (0: off)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (dynamic loss scale; GPU only); auto: resolve_precision
    # deterministic kernels (torch.use_deterministic_algorithms, cuDNN's deterministic convolutions): on a GPU the
    # condition for a bit-for-bit resume, slower; on a CPU training is deterministic already
    deterministic: bool = False
    zero_stage: int = 2  # DeepSpeed ZeRO stage 1, 2 or 3
    ema_rates: list[float] = field(default_factory=lambda: [0.9999])  # EMA decay per optimizer step
    power_ema: list[float] = field(default_factory=list)  # EDM2 power-function EMA widths (sigma_rel), e.g. [0.05, 0.1]
    seed: int = 0
    num_slots: int = 64  # canonical data slots (must be divisible by world size x workers)
    data_workers: int = 2  # DataLoader workers per rank
    jpeg_draft: bool = False  # decode JPEG shards at a reduced DCT scale (2x faster, not ADM-exact pixels)
    # upsampler: train on random patch_size x patch_size crops of each image, aligned to the upsampling factor, the
    # low-resolution input cropped alike (SR3's and Imagen's practice, not ADM's); it samples whole images. 0: whole
    patch_size: int = 0
    # NHWC inputs. Off: torch's GroupNorm keeps NHWC on CPU only (on a GPU every norm converts back), and on
    # CPU fp32 NHWC ran 14% slower; `bench/models.py --layouts` times both on a GPU
    channels_last: bool = False
    # GroupNorm reads and writes float32 (ADM's) or, false, the training dtype: its kernels accumulate in float32
    # either way, and bf16 skips a float32 copy of each normalised activation (`bench/models.py --norm-io` times it)
    norm_fp32: bool = True
    status_kimg: float = 1.0  # one status line (and TensorBoard scalars) per this many kimg
    checkpoint_kimg: float = 50.0  # training state for resuming
    snapshot_kimg: float = 50.0  # consolidated EMA weights for evaluation
    grid: bool = True  # with every snapshot, an image grid sampled from the EMA weights (diffusion task)
    grid_size: int = 4  # grid of grid_size x grid_size images, 25-step DDIM, fixed seeds and labels
    val_batches: int = 4  # held-out batches per rank at every status line (classifier with val_data)
    keep_last: int = 2  # training states to keep (plus every keep_every_kimg); 0: keep them all
    keep_every_kimg: float = 0.0
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    # a collective that waits longer fails every rank: the others wait in one while rank 0 alone writes a snapshot
    # (raw weights and every EMA) or prunes checkpoints, minutes for a large model on a slow shared filesystem
    collective_timeout_min: float = 30.0
    log_sample_ids: bool = False  # write "epoch id" of every consumed sample to RUN/sample_ids/ (audit)

    def __post_init__(self):
        def bad(key, msg):
            raise ValueError(f"{key}: {msg}")
        if self.task not in TASKS:
            bad("task", f"{self.task!r} is not one of {', '.join(TASKS)}")
        if self.precision not in PRECISIONS:
            bad("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.zero_stage not in (1, 2, 3):
            bad("zero_stage", f"must be 1, 2 or 3, got {self.zero_stage}")
        if self.batch <= 0 or self.micro_batch < 0:
            bad("batch", "batch must be positive and micro_batch >= 0")
        if self.total_kimg <= 0:
            bad("total_kimg", "must be positive")
        want = {"diffusion": "unet", "classifier": "classifier", "upsampler": "upsampler"}[self.task]
        if self.model.arch != want:
            bad("model.arch", f"task {self.task} trains a {want}, the model is a {self.model.arch}")
        m = self.model
        if self.task == "upsampler" and m.image_size % m.small_size:  # the loader area-downsamples by a whole factor
            bad("model.small_size", f"{m.small_size} does not divide image_size {m.image_size}")
        if self.patch_size:
            factor = m.image_size // m.small_size if self.task == "upsampler" else 0
            levels = 2 ** (len(m.resolved_channel_mult()) - 1)  # the UNet halves a patch this often
            if self.task != "upsampler":
                bad("patch_size", f"only the upsampler trains on patches (task {self.task}); set it to 0")
            if not 0 < self.patch_size < m.image_size or self.patch_size % factor or self.patch_size % levels:
                bad("patch_size", f"{self.patch_size}: 0 (whole images) or less than model.image_size {m.image_size} "
                                  f"and a multiple of both the upsampling factor {factor} and the UNet's {levels}")
        if not self.ema_rates or any(not 0.0 <= r < 1.0 for r in self.ema_rates):
            bad("ema_rates", f"give at least one rate, each in [0, 1), got {self.ema_rates}")
        if any(not SIGMA_REL_MIN <= s < 0.28 for s in self.power_ema):
            bad("power_ema", f"every sigma_rel must lie in [{SIGMA_REL_MIN}, 0.28), got {self.power_ema}")
        for name, values in (("ema_rates", self.ema_rates), ("power_ema", self.power_ema)):
            if len(set(values)) != len(values):  # one file each: the second would silently be the first
                bad(name, f"each value once, got {values}")
        for f in fields(self):  # nan passes every comparison below as "off"; inf overflows the image counts
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f.name, f"must be a finite number, got {value}")
        if not 0 <= self.seed < 2 ** 63:  # torch's generators take a 64-bit seed, numpy's a non-negative one
            bad("seed", f"must lie in [0, 2^63), got {self.seed}")
        if self.total_kimg * 1000 < self.batch:
            bad("total_kimg", f"{self.total_kimg:g} kimg is less than one global batch of {self.batch} images")
        if not self.lr > 0:
            bad("lr", f"must be positive, got {self.lr}")
        if len(self.betas) != 2 or any(not 0.0 <= b < 1.0 for b in self.betas):
            bad("betas", f"AdamW takes two betas, each in [0, 1), got {self.betas}")
        for key in ("weight_decay", "warmup_kimg", "grad_clip", "keep_every_kimg"):
            if getattr(self, key) < 0:
                bad(key, f"must be 0 or more, got {getattr(self, key)}")
        for key in ("status_kimg", "checkpoint_kimg", "snapshot_kimg", "collective_timeout_min"):
            if not getattr(self, key) > 0:
                bad(key, f"must be positive, got {getattr(self, key)}")
        for key in ("grid_size", "val_batches", "max_bad_steps"):
            if getattr(self, key) < 1:
                bad(key, f"must be at least 1, got {getattr(self, key)}")
        if self.keep_last < 0:
            bad("keep_last", f"must be 0 (keep every checkpoint) or more, got {self.keep_last}")
        if self.num_slots < 1 or self.data_workers < 0:
            bad("num_slots" if self.num_slots < 1 else "data_workers",
                f"num_slots must be at least 1 and data_workers at least 0, got {self.num_slots} and {self.data_workers}")

    def fixed(self) -> dict:
        """What a resume may not change: the task, the architecture and the diffusion, and what the saved
        state is laid out by: the data order (seed, canonical slots) and the EMA rates and widths."""
        fixed = {"task": self.task, "model": asdict(self.model), "diffusion": asdict(self.diffusion),
                 "seed": self.seed, "num_slots": self.num_slots, "ema_rates": [float(r) for r in self.ema_rates],
                 "power_ema": [float(s) for s in self.power_ema]}
        for name in CHANGEABLE_MODEL_FIELDS:
            fixed["model"].pop(name)
        return fixed

    def fixed_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.fixed(), sort_keys=True).encode()).hexdigest()[:16]

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(micro batch per rank, gradient accumulation steps) for this world size, or a clear error."""
        if world_size < 1:
            raise ValueError(f"world size: need at least one process, got {world_size}")
        if self.batch % world_size:
            raise ValueError(f"batch: the global batch {self.batch} is not divisible by the world size {world_size}")
        per_rank = self.batch // world_size
        micro = self.micro_batch or per_rank
        if per_rank % micro:
            raise ValueError(f"micro_batch: {micro} does not divide the per-rank batch {per_rank} "
                             f"(= batch {self.batch} / world size {world_size})")
        return micro, per_rank // micro


# The paper's training hyperparameters (ADM Tables 11-13; guided-diffusion's README), as overrides
# on TrainConfig; `model` names a model preset.
TRAIN_PRESETS = {
    "adm-64": dict(model="adm-64", batch=2048, lr=3e-4, total_kimg=540_000 * 2048 / 1000,
                   diffusion=dict(noise_schedule="cosine")),
    "adm-128": dict(model="adm-128", batch=256, lr=1e-4, total_kimg=4_360_000 * 256 / 1000),
    "adm-256": dict(model="adm-256", batch=256, lr=1e-4, total_kimg=1_980_000 * 256 / 1000),
    # Table 4: the unconditional 256 model, 2M iterations at batch 256 (the conditional's settings otherwise)
    "adm-256-uncond": dict(model="adm-256-uncond", batch=256, lr=1e-4, total_kimg=2_000_000 * 256 / 1000),
    "adm-512": dict(model="adm-512", batch=256, lr=1e-4, total_kimg=1_940_000 * 256 / 1000),
    "adm-lsun": dict(model="adm-lsun", batch=256, lr=1e-4, total_kimg=500_000 * 256 / 1000),
    # the classifiers anneal the lr linearly to 0: the one recipe published in full (128's, guided-diffusion's
    # README: --anneal_lr True); Table 12 gives the others the same recipe but for size, batch, lr and decay
    "classifier-64": dict(task="classifier", model="classifier-64", batch=1024, lr=6e-4, weight_decay=0.2,
                          lr_decay=True, total_kimg=300_000 * 1024 / 1000, diffusion=dict(noise_schedule="cosine")),
    "classifier-128": dict(task="classifier", model="classifier-128", batch=256, lr=3e-4, weight_decay=0.05,
                           lr_decay=True, total_kimg=300_000 * 256 / 1000),
    "classifier-256": dict(task="classifier", model="classifier-256", batch=256, lr=3e-4, weight_decay=0.05,
                           lr_decay=True, total_kimg=500_000 * 256 / 1000),
    "classifier-512": dict(task="classifier", model="classifier-512", batch=256, lr=3e-4, weight_decay=0.05,
                           lr_decay=True, total_kimg=500_000 * 256 / 1000),
    "upsampler-64-256": dict(task="upsampler", model="upsampler-64-256", batch=256, lr=1e-4,
                             total_kimg=500_000 * 256 / 1000),
    "upsampler-128-512": dict(task="upsampler", model="upsampler-128-512", batch=256, lr=1e-4,
                              total_kimg=1_050_000 * 256 / 1000),
    "tiny-32": dict(model="tiny-32", batch=32, lr=2e-4, total_kimg=2.0, diffusion=dict(noise_schedule="cosine")),
    "tiny-classifier-32": dict(task="classifier", model="tiny-classifier-32", batch=32, lr=3e-4, weight_decay=0.05,
                               total_kimg=2.0, diffusion=dict(noise_schedule="cosine")),
    "tiny-upsampler-32-64": dict(task="upsampler", model="tiny-upsampler-32-64", batch=16, lr=2e-4, total_kimg=1.0),
}


def resolve_precision(precision: str, device) -> str:
    """`auto`: bf16 where the device computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX),
    fp16 on older GPUs (ADM's own choice), fp32 on other CPUs, where bf16 is emulated and ~10x slower."""
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda":
        # not counting emulation: torch calls a V100 or T4 "bf16-capable" because it can hold the type
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # a private torch helper
    return "bf16" if native() else "fp32"


def expand(raw: dict) -> dict:
    """Resolve `preset:` (a training preset) and `model: NAME` / `model: {preset: NAME, ...}` into plain
    TrainConfig fields, so everything else is checked by the schema."""
    _plain(raw, "")
    raw = json.loads(json.dumps(raw))
    preset = raw.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str):
            raise ValueError(f"preset: expected a training preset's name, got {preset!r}")
        if preset not in TRAIN_PRESETS:
            raise ValueError(f"unknown training preset {preset!r}; known: {', '.join(TRAIN_PRESETS)}")
        base = json.loads(json.dumps(TRAIN_PRESETS[preset]))
        for k, v in raw.items():
            if k == "model" and isinstance(v, dict) and isinstance(base.get(k), str):
                base[k] = {"preset": base[k], **v}  # overrides on the preset's model
            elif isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k] = {**base[k], **v}
            else:
                base[k] = v
        raw = base
    model = raw.get("model")
    if isinstance(model, str):
        model = {"preset": model}
    if "diffusion" in raw and not isinstance(raw["diffusion"], dict):
        raise ValueError(f"diffusion: expected a section (diffusion.noise_schedule=cosine, ...), got {raw['diffusion']!r}")
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        name = model.pop("preset")
        if not isinstance(name, str):
            raise ValueError(f"model.preset: expected a model preset's name, got {name!r}")
        raw["model"] = {**get_preset(name).model, **model}
        diffusion = raw.setdefault("diffusion", {})
        diffusion.setdefault("noise_schedule", get_preset(name).diffusion["noise_schedule"])
        diffusion.setdefault("steps", get_preset(name).diffusion["steps"])
    return raw


def _plain(value, key: str) -> None:
    """Values a config holds: YAML's plain ones (a `!!binary` or other tagged value is refused by name)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{key + '.' if key else ''}{k!r}: keys are names")
            _plain(v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain(v, f"{key}[{i}]")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"{key}: a {type(value).__name__} value; expected a number, text, true/false, a list "
                         "or a section")


def load_train_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    from adm.config import ConfigError, build, parse_overrides, read_yaml

    raw = read_yaml(path) if path else {}
    over = parse_overrides(list(overrides))
    # overrides may name a preset too; merge them before expanding so `model.dropout=...` applies
    merged = _deep_merge(raw, over)
    try:
        return build(TrainConfig, (str(path) if path else "command line", expand(merged)))
    except ConfigError as e:
        given = set(_dotted(over))  # the keys the command line set
        if path and any(str(e).startswith(f"{path}: bad value for '{k}'") for k in given):
            raise ConfigError("command line" + str(e)[len(str(path)):]) from None  # its value, not the file's
        if not path or not over or not _builds(raw):
            raise
    # the file builds on its own: the mistake is in the command line's overrides, and is named so
    return build(TrainConfig, ("command line", expand(merged)))


def _dotted(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        yield from _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]


def _builds(raw: dict) -> bool:
    from adm.config import build

    try:
        build(TrainConfig, ("", expand(dict(raw))))
        return True
    except Exception:  # a config error of the file's own
        return False


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if k == "model" and isinstance(v, dict) and isinstance(out.get(k), str):
            out[k] = {"preset": out[k], **v}  # `model: tiny-32` in the file, model.dropout=... on the command line
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every leaf that differs between two option trees."""
    out = {}
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(differences(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


def fixed_changes(was: dict, cfg: "TrainConfig") -> dict[str, tuple]:
    """What a resume may not change, as `differences`, between a run's recorded fields (a checkpoint's or
    a snapshot's; older ones record fewer) and cfg: the fields `was` has, its changeable model fields left out."""
    model = {k: v for k, v in (was.get("model") or {}).items() if k not in CHANGEABLE_MODEL_FIELDS}
    was = {**was, "model": model} if "model" in was else was
    return differences(was, {k: v for k, v in cfg.fixed().items() if k in was})


def describe(changes: dict[str, tuple], then: str = "in the run", now: str = "now") -> str:
    return "; ".join(f"{k}: {a!r} {then}, {b!r} {now}" for k, (a, b) in changes.items())
