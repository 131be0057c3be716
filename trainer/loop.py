"""The training loop: one function, top to bottom (EDM2's style), for the three ADM tasks.

Progress is counted in images; every knob is a field of TrainConfig. DeepSpeed does the distributed
optimisation; this file only knows `engine(...)`, `engine.backward`, `engine.step` and checkpoints.
"""

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline.loader import StreamLoader, merge_states
from models.adm_compat import create_gaussian_diffusion
from models.config import build_model
from models.layers import set_norm_io
from models.resample import LossAwareSamplerMixin, create_named_schedule_sampler

from . import checkpoint as ckpt
from . import distributed as dist_util
from . import runlock
from .config import TrainConfig, describe, differences, resolve_precision
from .ema import ShardEMA
from .preemption import EXIT_REQUEUE, PreemptionFlag

log = logging.getLogger("adm.train")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why."""


BUCKET = 200_000_000  # elements per ZeRO-1/2 gradient-reduction and all-gather bucket on GPUs


def deepspeed_config(cfg: TrainConfig, micro: int, accum: int, cuda: bool = False) -> dict:
    # on GPUs, ZeRO-1/2 overlap the gradient reduction with the backward pass (DeepSpeed does so by
    # default for stage 3 only); on CPU (gloo) the plain order keeps runs bit-comparable. Overlapping doubles
    # the reduction buffer, which DeepSpeed sizes at 5e8 elements (4 GB in fp32 under ZeRO-1, twice): buckets of
    # 2e8 elements, large enough to keep NCCL at full bandwidth, hold it to 1.6 GB at most
    overlap = ({"overlap_comm": True, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET}
               if cuda and cfg.zero_stage in (1, 2) else {})
    return {
        "train_batch_size": cfg.batch, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,  # DeepSpeed averages micro-batches (loss / accum)
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": cfg.zero_stage, **overlap},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 16 if cfg.task == "classifier" else 20,
                 "loss_scale_window": 1000, "hysteresis": 1, "min_loss_scale": 1},
        "gradient_clipping": cfg.grad_clip,
        "steps_per_print": 1 << 62, "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) synchronises the device at the start of every forward
        # and the end of every step, so the host could never queue a step ahead; the status line times steps
        "timers": {"throughput": {"enabled": False}},
    }


def gather_losses(ts: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (timesteps, losses), in rank order, on their device: the loss-aware sampler's history must
    be identical on every rank. One all-gather of both, exact in float64, and no wait for it on the host."""
    both = dist_util.all_gather_cat(torch.stack([ts.double(), losses.double()], 1))
    return both[:, 0].long(), both[:, 1]


def _quartiles(means: dict, name: str) -> str:
    """The four timestep quartiles' means, "-" for one no sample fell in (a short interval, diffusion.steps < 4)."""
    return "/".join(f"{means[k]:.3g}" if (k := f"{name}_q{q}") in means else "-" for q in range(4))


def lr_at(cfg: TrainConfig, images: int) -> float:
    factor = 1.0
    if cfg.warmup_kimg > 0:
        factor = min(factor, images / (cfg.warmup_kimg * 1000))
    if cfg.lr_decay:
        factor = min(factor, max(0.0, 1.0 - images / (cfg.total_kimg * 1000)))
    return cfg.lr * factor


def _seed(value: int) -> int:
    """A generator seed derived from the config's (any seed below 2^63), folded into torch's 64 bits."""
    return value % 2**64


def process_start() -> float:
    """When this training was started (time.time()'s clock): the rank's own process, or, for a rank that
    `adm train --nproc N` started, the launcher, whose config and data checks come first."""
    import psutil

    if os.environ.get("ADM_LOCAL_CHILD") == "1" and os.environ.get("ADM_LAUNCHER_START"):
        return min(float(os.environ["ADM_LAUNCHER_START"]), psutil.Process().create_time())
    return psutil.Process().create_time()


def order_change(was_workers: int, workers: int, elastic: bool) -> str | None:
    """What another data_workers does to a resume at the same world size (at another, the world size's
    change says it): the batches' order, not which samples an epoch holds."""
    if elastic or max(1, was_workers) == max(1, workers):  # (0 and 1 workers read alike)
        return None
    return (f"data_workers {workers}, was {was_workers}: the batches come in another order from here than in an "
            "uninterrupted run (each rank's turns pass between its workers' slots); every sample still comes once "
            f"an epoch. A bit-identical continuation needs data_workers={was_workers}")


def write_options(run_dir: Path, options: dict, resumed_at: int | None) -> None:
    """training_options.json: this launch's resolved options (and world size). On a resume, what changed since
    the last launch (the learning rate, the world size, say) is said and kept in training_options.changes.jsonl."""
    path = run_dir / "training_options.json"
    if resumed_at is not None and path.is_file():
        old = ckpt.read_options(run_dir)
        changes = {k: v for k, v in differences(old, options).items()  # (world_size: unknown to older files)
                   if k != "run_dir" and (k in old or k != "world_size")}
        if changes:
            log.info("changed since the last launch: %s", describe(changes, "then", "now"))
            with open(run_dir / "training_options.changes.jsonl", "a") as f:
                f.write(json.dumps({"images": resumed_at, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
    ckpt.write_bytes_atomic(path, (json.dumps(options, indent=2) + "\n").encode())


def _bad_streak_message(run_dir: Path, bad: int, images: int, batch: int, good_tag: str | None, found) -> str:
    """Where to go on from after `bad` non-finite steps in a row: the last checkpoint saved before they began
    (the ones saved during them were kept beside it); one resumed from that failed from its first step
    may itself be damaged."""
    where = run_dir / ckpt.CKPT
    text = (f"{bad} non-finite steps in a row at {images / 1000:g} kimg; the last good checkpoint is "
            f"{where / good_tag if good_tag else '(none)'}")
    if found and good_tag == found[0] and images - bad * batch == ckpt.images_of(found[0]):
        older = [t for t in ckpt.valid_tags(run_dir) if ckpt.images_of(t) < ckpt.images_of(found[0])]
        text += (f", which this run resumed from and whose every step since was non-finite: if its loss was finite "
                 f"before, it may be damaged; move it aside to resume from "
                 + (f"{where / older[-1]}" if older else "an older one (there is none left)"))
    return text + ": lower the learning rate or use another precision, then resume"


def set_kernels(device: torch.device, precision: str, deterministic: bool) -> None:
    """PyTorch's kernel choices for this process's training."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition (read at its first call)
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without such a kernel warns, naming itself
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # fixed shapes: pick the fastest convolution once
        torch.backends.cudnn.deterministic = deterministic
        if precision == "fp32":  # true float32: PyTorch's default runs cuDNN's convolutions in TF32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def training_loop(cfg: TrainConfig) -> int:
    """Train until cfg.total_kimg; returns 0, or EXIT_REQUEUE after a preemption save."""
    import deepspeed

    env = dist_util.discover()
    device = dist_util.init(env, cfg.collective_timeout_min)
    cfg.precision = resolve_precision(cfg.precision, device)  # written resolved to training_options.json
    set_kernels(device, cfg.precision, cfg.deterministic)
    rank, world = env.rank, env.world_size
    micro, accum = cfg.batch_layout(world)  # clear errors before any heavy work
    run_dir = Path(cfg.run_dir)
    total_images = int(cfg.total_kimg * 1000)
    preempt = PreemptionFlag()
    is_main = rank == 0
    if is_main:
        log.info("precision %s%s%s on %s", cfg.precision, ", channels-last" if cfg.channels_last else "",
                 ", deterministic kernels" if cfg.deterministic else "", device)
        (run_dir / ckpt.CKPT).mkdir(parents=True, exist_ok=True)

    # ---- data, model, diffusion ------------------------------------------------------------
    m = cfg.model
    loader = StreamLoader(cfg.data, m.image_size, micro, crop="random-resized" if cfg.task == "classifier" else "center",
                          flip=True, small_size=m.small_size if cfg.task == "upsampler" else 0, seed=cfg.seed,
                          num_slots=cfg.num_slots, rank=rank, world_size=world, num_workers=cfg.data_workers,
                          jpeg_draft=cfg.jpeg_draft, pin_memory=device.type == "cuda", patch=cfg.patch_size)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = build_model(m)  # weights stay contiguous (DeepSpeed flattens them); inputs too unless channels_last
    model.patch_size = cfg.patch_size  # (an upsampler trained on patches takes them; snapshots sample whole images)
    set_norm_io(model, cfg.norm_fp32)
    torch.manual_seed(cfg.seed + 104_729 * rank)  # then dropout draws differ between ranks (CPU and CUDA)
    d = cfg.diffusion
    diffusion = create_gaussian_diffusion(steps=d.steps, learn_sigma=m.learn_sigma, noise_schedule=d.noise_schedule,
                                          use_kl=d.use_kl, predict_xstart=d.predict_xstart,
                                          rescale_learned_sigmas=d.rescale_learned_sigmas)

    sampler = create_named_schedule_sampler(d.schedule_sampler, diffusion, sync=gather_losses)
    skipped, refused = [], None
    if is_main:
        try:
            if not os.environ.get("ADM_LOCAL_CHILD"):  # `adm train --nproc N` holds it in the launcher
                runlock.acquire(run_dir)
            for line in ckpt.finish_interrupted_commits(run_dir):
                log.warning("%s", line)
            found = ckpt.resume_point(run_dir, skipped)
            ckpt.clear_failed_conversions(run_dir)
            refused = found and ckpt.refusal(run_dir, found[0], cfg)
        except (ckpt.CheckpointError, runlock.RunDirBusy) as e:
            found, refused = None, str(e)
    found, refused = dist_util.broadcast_object((found, refused) if is_main else None)
    if refused:  # `adm train` checked this before starting the ranks; launched otherwise, every rank stops here
        raise TrainingStopped(refused)
    if is_main and skipped:
        log.warning("skipped incomplete checkpoints: %s", "; ".join(skipped))
    then = ckpt.saved_layout(run_dir, found[0]) if found else None
    now = {"world size": world, "ZeRO stage": cfg.zero_stage, "precision": cfg.precision}
    elastic = bool(found) and any(then.get(k, v) != v for k, v in now.items())
    ds_config = deepspeed_config(cfg, micro, accum, cuda=device.type == "cuda")
    if elastic:  # another world size, ZeRO stage or precision: load through DeepSpeed's universal checkpoint
        universal = ckpt.universal_dir(run_dir, found[0]) if is_main else ckpt.wait_universal(run_dir, found[0])
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    param_dtype = next(engine.module.parameters()).dtype
    ema = ShardEMA(engine, cfg.ema_rates, cfg.zero_stage, cfg.power_ema)
    ema_layout = ema.layout()
    gen = torch.Generator(device).manual_seed(_seed(cfg.seed * 1_000_003 + rank))  # timesteps and noise

    # ---- resume ----------------------------------------------------------------------------
    images, step = 0, 0
    rng_state = cuda_rng_state = None
    saved_at = None  # the image count of the newest checkpoint on disk
    counted = {}  # the skip counters since the run began (client.json), carried on by this launch
    good_tag = None  # the newest checkpoint saved (or resumed from) while no non-finite streak ran
    if found:
        load_start = time.perf_counter()
        tag, manifest = found
        client = json.loads((run_dir / ckpt.CKPT / tag / "client.json").read_text())
        if elastic:
            engine.load_checkpoint(str(universal), tag="ds", load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            ema.refresh()
            # every old rank's EMA shards, memory-mapped: the ranks of a node share them in the page cache
            old = [torch.load(f, map_location="cpu", weights_only=False, mmap=True)
                   for f in [run_dir / ckpt.CKPT / tag / f"rank{r:05d}.pt" for r in range(manifest["world_size"])]]
            ema.load_resharded(client["ema_layout"], {k: [ShardEMA.shards_of(o["ema"])[k] for o in old]
                                                      for k in ema.all_shadows()})
            ema.updates = client["ema_updates"]
            if ema.power is not None:
                ema.power.steps = client["ema_updates"]
            own = old[0]  # the timestep sampler's history: the same on every rank
            gen.manual_seed(_seed(cfg.seed * 1_000_003 + rank + 7919 * client["images"]))
            torch.manual_seed(cfg.seed + 104_729 * rank + client["images"])
        else:
            engine.load_checkpoint(str(run_dir / ckpt.CKPT / tag), tag="ds", load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            ema.refresh()
            own = torch.load(run_dir / ckpt.CKPT / tag / f"rank{rank:05d}.pt", map_location="cpu", weights_only=False)
            ema.load_state_dict(own["ema"])
            if ckpt.saved_device(own) == device.type:
                gen.set_state(own["gen"])
                rng_state, cuda_rng_state = own["torch_rng"], own.get("cuda_rng")
            else:  # saved on another kind of device: its generator states do not fit this one's
                gen.manual_seed(_seed(cfg.seed * 1_000_003 + rank + 7919 * client["images"]))
                torch.manual_seed(cfg.seed + 104_729 * rank + client["images"])
        if hasattr(sampler, "load_state_dict") and own.get("sampler"):
            sampler.load_state_dict(own["sampler"])
        loader.load_state_dict(client["loader"])
        images, step = client["images"], client["step"]
        counted = client.get("counted", {})
        saved_at, good_tag = images, tag
        dist_util.barrier()
        if is_main:
            size, seconds = sum(manifest["files"].values()), time.perf_counter() - load_start
            print(f"[ckpt] loaded {tag} in {seconds:.2f} s ({size / 2 ** 20:.1f} MiB, "
                  f"{size / 2 ** 20 / max(seconds, 1e-9):.1f} MiB/s)", flush=True)
            changed = [f"{k} {then[k]}, now {v}" for k, v in now.items() if then.get(k, v) != v]
            log.info("resumed from %s at %g kimg%s", tag, images / 1000,
                     f" (saved at {'; '.join(changed)}: universal checkpoint)" if elastic else "")
            if note := order_change(client["loader"].get("num_workers", loader.num_workers), loader.num_workers,
                                    elastic):
                log.warning("%s", note)
    if is_main:
        write_options(run_dir, {**asdict(cfg), "world_size": world}, images if found else None)
    batches = iter(loader)  # before restoring the RNG: creating the iterator draws from it
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    if cuda_rng_state is not None:
        torch.cuda.set_rng_state(cuda_rng_state, device)

    def save_state():
        nonlocal saved_at, good_tag
        save_start = time.perf_counter()
        tag = ckpt.tag_for(images)
        tmp = ckpt.tmp_dir(run_dir, tag)
        if is_main:  # emptied first: a failed save's files there would pass for this save's in its manifest
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_util.barrier()
        try:
            with ckpt.without_zip_crc():
                engine.save_checkpoint(str(tmp), tag="ds", save_latest=False, client_state={
                    "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
                torch.save({"ema": ema.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                            "device": device.type,
                            "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None},
                           tmp / f"rank{rank:05d}.pt")
        except (OSError, RuntimeError) as e:
            raise TrainingStopped(_write_failed(f"saving checkpoint {tag} into {tmp}", e, run_dir, rank,
                                                f"the checkpoint before it ({good_tag or 'none'}) is intact: "
                                                "make room and run the same command to resume from it")) from e
        loader_state = merge_states(dist_util.gather_objects(loader.state_dict()))
        data_skipped = sum(dist_util.gather_objects(stats.data_skipped))
        if is_main:  # the EMA layout lets a resume at another world size assemble the EMA from the rank files
            ckpt.write_json_atomic(tmp / "client.json", {"images": images, "step": step, "fixed_hash": cfg.fixed_hash(),
                                                         "fixed": cfg.fixed(), "zero_stage": cfg.zero_stage,
                                                         "precision": cfg.precision,
                                                         "loader": loader_state, "world_size": world,
                                                         "ema_updates": ema.updates, "ema_layout": ema_layout,
                                                         "counted": {"skipped_steps": stats.skipped_steps,
                                                                     "data_skipped": data_skipped}})
        dist_util.barrier()  # every file is written: each rank flushes the ones it wrote to the disk
        written = dist_util.gather_objects(ckpt.fsync_files(tmp, rank))  # (gathered: also a barrier)
        if is_main:
            final = ckpt.commit(run_dir, tag, world, {k: v for files in written for k, v in files.items()})
            size = sum(json.loads((final / ckpt.MANIFEST).read_text())["files"].values())
            seconds = time.perf_counter() - save_start
            print(f"[ckpt] saved {tag} in {seconds:.2f} s ({size / 2 ** 20:.1f} MiB, "
                  f"{size / 2 ** 20 / max(seconds, 1e-9):.1f} MiB/s)", flush=True)
            if bad_in_row:  # its weights may be past saving: the older ones stay until the steps are finite again
                print(f"[ckpt] {bad_in_row} non-finite steps in a row so far: every older checkpoint is kept",
                      flush=True)
            else:
                ckpt.prune(run_dir, cfg.keep_last, int(cfg.keep_every_kimg * 1000), keep=tag)
        dist_util.barrier()
        saved_at = images
        if not bad_in_row:
            good_tag = tag

    def save_snapshot():
        from models.snapshot import save_snapshot as write

        weights = ema.full_state_dicts(include_raw=True)  # collective
        if is_main:  # the main weights: the first EMA; ADM's classifier keeps none (its EMA goes beside)
            first = "raw" if cfg.task == "classifier" else f"ema_{cfg.ema_rates[0]}"
            extra = {k: v for k, v in weights.items() if k != first}
            try:
                path = write(run_dir / "snapshots" / ckpt.tag_for(images), weights[first], m, overwrite=True,
                             extra_weights=extra,
                             meta={"task": cfg.task, "images": images, "step": step, "weights": first,
                                   "ema_rate": None if first == "raw" else cfg.ema_rates[0],
                                   "ema_updates": ema.updates,
                                   "power_ema": {"sigma_rels": cfg.power_ema,
                                                 "gammas": ema.power.gammas if ema.power else []},
                                   "diffusion": d.for_sampling(),
                                   "training_options": asdict(cfg)})
            except (OSError, RuntimeError) as e:  # (safetensors' errors are RuntimeErrors)
                raise TrainingStopped(_write_failed(
                    f"writing snapshot {ckpt.tag_for(images)}", e, run_dir, rank,
                    f"checkpoint {good_tag} holds its weights: make room and run the same command, which writes "
                    "the snapshot from it" if good_tag == ckpt.tag_for(images) else
                    "make room and run the same command to resume")) from e
            if cfg.grid and cfg.task == "diffusion":
                from .grid import sample_grid, save_grid
                grid = sample_grid(weights[first], cfg, device)
                (run_dir / "grids").mkdir(exist_ok=True)
                save_grid(grid, run_dir / "grids" / f"{ckpt.tag_for(images)}.png")
                if writer:
                    import numpy as np
                    writer.add_image("samples/ema", np.asarray(grid), images, dataformats="HWC")
            log.info("snapshot %s", path)
        dist_util.barrier()

    # ---- the loop --------------------------------------------------------------------------
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tensorboard"))
    stats = _Stats(diffusion.num_timesteps)
    stats.skipped_steps = counted.get("skipped_steps", 0)  # the same on every rank (a skip is collective)
    stats.data_skipped = counted.get("data_skipped", 0) if is_main else 0  # shown summed over the ranks
    val_batches = None
    if cfg.val_data and cfg.task == "classifier":
        with torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws its seed from the global generator:
            # outside the training's draws, or a resume (which restores them first) would shift its dropout masks
            val_batches = iter(StreamLoader(cfg.val_data, m.image_size, micro, crop="center", flip=False,
                                            seed=cfg.seed, num_slots=world, rank=rank, world_size=world,
                                            num_workers=0))  # a slot each
        val_gen = torch.Generator(device).manual_seed(10_007 + rank)

    def validate():
        """Held-out top-1/top-5 (overall and by timestep quartile), noised like training."""
        val = _Stats(diffusion.num_timesteps)
        engine.eval()
        with torch.no_grad():
            for _ in range(cfg.val_batches):
                vb = next(val_batches)
                x, y = vb["image"].to(device), vb["label"].to(device)
                t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=val_gen, device=device)
                logits = engine(diffusion.q_sample(x, t, generator=val_gen).to(param_dtype), t).float()
                val.add_classifier(t, F.cross_entropy(logits, y, reduction="none"), logits, y)
        engine.train()
        return val
    audit = None
    if cfg.log_sample_ids:  # "epoch id" per consumed sample, per rank: which data did this run see
        (run_dir / "sample_ids").mkdir(parents=True, exist_ok=True)
        audit = open(run_dir / "sample_ids" / f"rank{rank:05d}-from-{images:012d}.txt", "a", buffering=1)
    next_status = _next_multiple(images, cfg.status_kimg)
    next_ckpt = _next_multiple(images, cfg.checkpoint_kimg)
    next_snap = _next_multiple(images, cfg.snapshot_kimg)
    # the snapshot of the checkpoint resumed from, if its write failed or was cut short after the commit
    if found and dist_util.broadcast_object(ckpt.missed_snapshot(run_dir, images, total_images, cfg.snapshot_kimg)
                                            if is_main else None):
        if is_main:
            log.warning("the snapshot due at %g kimg is missing (its write failed or was cut short after the "
                        "checkpoint was saved): writing it from %s", images / 1000, found[0])
        save_snapshot()
    bad_in_row = 0
    interval = {"start": time.perf_counter(), "images": images, "paused": 0.0}  # the status line's window
    first_step = True
    stop_requested = dist_util.AnyRankLater(device)

    def paused(work):  # checkpoints, snapshots and validation: not counted in the training throughput
        began = time.perf_counter()
        result = work()
        interval["paused"] += time.perf_counter() - began
        return result

    while images < total_images:
        if stop_requested(preempt.requested):  # ranks agree at a step boundary (a step after the signal)
            preempt.agree()
            if saved_at != images:  # not when the state at this count is on disk already (just saved or resumed)
                save_state()
            if is_main:
                log.warning("preemption signal (%s): saved at %g kimg; run the same command to resume",
                            preempt.signal_name or "on another rank", images / 1000)
            return EXIT_REQUEUE
        lr = lr_at(cfg, images)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        skipped_before = engine.skipped_steps
        for _ in range(accum):
            batch = next(batches)
            x = batch["image"].to(device, non_blocking=True)  # pinned on GPUs: an asynchronous copy
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["label"].to(device, non_blocking=True)
            stats.data_skipped += int(batch["skipped"])
            if audit is not None:
                audit.write("".join(f"{p[1]} {i}\n" for p, i in zip(batch["pos"].tolist(), batch["id"].tolist())))

            def net(inp, t, **kw):
                kw = {k: v.to(param_dtype) if v.is_floating_point() else v for k, v in kw.items()}
                return engine(inp.to(param_dtype), t, **kw).float()

            if cfg.task == "classifier":
                t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=gen, device=device)
                logits = net(diffusion.q_sample(x, t, generator=gen), t)
                losses = F.cross_entropy(logits, y, reduction="none")
                loss = losses.mean()
                stats.add_classifier(t, losses.detach(), logits.detach(), y)
            else:
                kwargs = {"y": y} if m.class_cond else {}
                if cfg.task == "upsampler":
                    kwargs["low_res"] = batch["low_res"].to(device, non_blocking=True)
                t, weights = sampler.sample(x.shape[0], device, generator=gen)
                terms = diffusion.training_losses(net, x, t, model_kwargs=kwargs, generator=gen)
                if isinstance(sampler, LossAwareSamplerMixin):
                    sampler.update_with_local_losses(t, terms["loss"].detach())
                loss = (terms["loss"] * weights).mean()
                stats.add_diffusion(t, {k: v.detach() for k, v in terms.items()})
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
        step += 1
        images += cfg.batch
        if first_step and is_main:
            first_step = False
            since = time.time() - process_start()
            print(f"[timing] first step done {since:.1f} s after process start"
                  f"{' (resumed)' if found else ''}", flush=True)
        if engine.skipped_steps > skipped_before:  # non-finite gradients: DeepSpeed skipped the update
            stats.skipped_steps += 1
            bad_in_row += 1
            if bad_in_row >= cfg.max_bad_steps:
                raise TrainingStopped(_bad_streak_message(run_dir, bad_in_row, images, cfg.batch, good_tag, found))
        else:
            bad_in_row = 0
            ema.update()  # only after steps that were taken
        if images >= next_status or images >= total_images:
            stats.grad_norm = engine.get_global_grad_norm()
            stats.param_sq = sum(m.float().square().sum() for m in ema.masters())  # this rank's shards
            next_status = _next_multiple(images, cfg.status_kimg)
            training_s = time.perf_counter() - interval["start"] - interval["paused"]
            line = stats.flush(writer, images, lr, engine, (images - interval["images"]) / max(training_s, 1e-9),
                               device, interval["paused"])
            if val_batches is not None:
                line += " | val " + validate().flush_val(writer, images)
            if is_main:
                print(f"[train] {images / 1000:9.3f} kimg | {line}", flush=True)
            interval.update(start=time.perf_counter(), images=images, paused=0.0)
        if images >= next_ckpt or images >= total_images:
            next_ckpt = _next_multiple(images, cfg.checkpoint_kimg)
            paused(save_state)
        if images >= next_snap or images >= total_images:
            next_snap = _next_multiple(images, cfg.snapshot_kimg)
            paused(save_snapshot)
    if writer:
        writer.close()
    if audit is not None:
        audit.close()
    preempt.ignore_further()
    return 0


def _write_failed(what: str, error: Exception, run_dir: Path, rank: int, then: str) -> str:
    """One clear line for a write that failed (a full disk, a file size limit): where, why, and what to do."""
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2 ** 30:.1f} GiB free there"
    except OSError:
        free = "free space unknown"
    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{what} failed on rank {rank}: {type(error).__name__}: {why} ({free}); {then}"


def _next_multiple(images: int, kimg: float) -> float:
    every = max(1, int(kimg * 1000))
    return (images // every + 1) * every


class _Stats:
    """Per-interval sums; flushed as one status line and TensorBoard scalars (means over all ranks)."""

    def __init__(self, num_timesteps: int):
        self.T = num_timesteps
        self.reset()
        self.skipped_steps = 0
        self.data_skipped = 0  # this rank's; the status line and TensorBoard show the sum over ranks
        self.grad_norm = None
        self.param_sq = None  # this rank's share of |params|^2 (fp32 master shards)

    def reset(self):
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, key, value: torch.Tensor):
        # accumulate on the device: no host sync in the training step, only at flush
        v = torch.stack([value.float().sum(), value.new_full((), value.numel(), dtype=torch.float32)])
        self.sums[key] = self.sums[key] + v if key in self.sums else v

    def _add_masked(self, key, value: torch.Tensor, mask: torch.Tensor):
        v = torch.stack([(value.float() * mask).sum(), mask.sum()])
        self.sums[key] = self.sums[key] + v if key in self.sums else v

    def add_diffusion(self, t, terms):
        for k, v in terms.items():
            self._add(k, v)
            quartile = t * 4 // self.T
            for q in range(4):  # quartiles of the timestep range (masked sums: no data-dependent shapes)
                sel = (quartile == q).float()
                self._add_masked(f"{k}_q{q}", v, sel)

    def add_classifier(self, t, losses, logits, y):
        self._add("loss", losses)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        quartile = t * 4 // self.T
        for q in range(4):
            self._add_masked(f"loss_q{q}", losses, (quartile == q).float())
        for name, hit in (("acc1", (top5[:, 0] == y).float()), ("acc5", (top5 == y[:, None]).any(1).float())):
            self._add(name, hit)
            for q in range(4):
                self._add_masked(f"{name}_q{q}", hit, (quartile == q).float())

    def means(self) -> dict[str, float]:
        """Means over every rank; also the sums over ranks of data_skipped (as "data_skipped") and of
        param_sq (as "param_norm", its square root) when set."""
        keys = sorted(self.sums)
        mine = {k: self.sums[k].cpu() for k in keys}
        mine["data_skipped"] = torch.tensor([float(self.data_skipped), 1.0])
        if self.param_sq is not None:
            mine["param_sq"] = torch.stack([self.param_sq.double().cpu(), torch.ones((), dtype=torch.float64)])
        gathered = dist_util.gather_objects(mine)
        total = {k: sum(g[k] for g in gathered if k in g) for k in mine}
        out = {k: (v[0] / v[1]).item() for k, v in total.items() if k in self.sums and v[1] > 0}
        out["data_skipped"] = int(total["data_skipped"][0])
        if "param_sq" in total:
            out["param_norm"] = math.sqrt(total["param_sq"][0].item())
        return out

    def flush_val(self, writer, images) -> str:
        means = self.means()
        means.pop("data_skipped")
        if writer:
            for k, v in means.items():
                writer.add_scalar(f"val/{k}", v, images)
        return f"acc1 {means['acc1']:.3f} acc5 {means['acc5']:.3f} (acc1 by t quartile {_quartiles(means, 'acc1')})"

    def flush(self, writer, images, lr, engine, img_per_s, device, paused_s: float = 0.0) -> str:
        """img_per_s: training throughput over the interval, without paused_s (checkpoints, snapshots, validation)."""
        means = self.means()
        data_skipped, param_norm = means.pop("data_skipped"), means.pop("param_norm", None)
        scale = getattr(engine.optimizer, "cur_scale", None)
        mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30) if device.type == "cuda" else _rss_gb()
        if writer:
            for k, v in means.items():
                writer.add_scalar(f"train/{k}", v, images)
            writer.add_scalar("train/lr", lr, images)
            writer.add_scalar("train/images_per_s", img_per_s, images)
            writer.add_scalar("train/maintenance_s", paused_s, images)
            writer.add_scalar("train/skipped_steps", self.skipped_steps, images)
            writer.add_scalar("data/skipped_samples", data_skipped, images)
            if self.grad_norm is not None:
                writer.add_scalar("train/grad_norm", float(self.grad_norm), images)
            if param_norm is not None:
                writer.add_scalar("train/param_norm", param_norm, images)
            if scale is not None:
                writer.add_scalar("train/loss_scale", float(scale), images)
            writer.flush()
        name = "acc1" if "acc1" in means else "loss"
        quart = f"{name} by t quartile {_quartiles(means, name)}"
        extra = f" acc1 {means['acc1']:.3f} acc5 {means['acc5']:.3f}" if "acc1" in means else ""
        self.reset()
        return (f"loss {means.get('loss', float('nan')):.4f} ({quart}){extra} | {img_per_s:7.1f} img/s | "
                f"{1000 / max(img_per_s, 1e-9):6.2f} s/kimg | lr {lr:.2e} | mem {mem:.2f} GB | "
                f"skipped steps {self.skipped_steps}, samples {data_skipped}"
                + (f" | ckpt/snapshot {paused_s:.1f} s" if paused_s >= 0.05 else ""))


def _rss_gb() -> float:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return math.nan
