"""`adm train CONFIG.yaml [key=value ...] [--nproc N]` / `python -m trainer ...`.

Re-running the same command resumes from the run directory's LATEST checkpoint.
"""

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from .preemption import EXIT_REQUEUE, RECEIVED, catch_early


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def launch_local(nproc: int, argv: list[str], lock_fd: int | None = None) -> int:
    """Start nproc ranks on this machine (gloo on CPU, NCCL on GPUs); forward preemption signals. The ranks
    inherit the run directory's lock (lock_fd), so it is held until the last of them ends, and are told to
    save and stop if the launcher dies."""
    import psutil

    from data_pipeline.parent_death import stop_with_parent

    from .distributed import _free_port

    port = _free_port()
    procs = []

    def forward(signum, frame):
        forwarded.add(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    forwarded = set()
    for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)  # first, then RECEIVED: a signal between the two is in one or the other
    forwarded |= {signal.Signals[n] for n in RECEIVED}  # got during the checks: passed on once the ranks exist
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), ADM_LOCAL_CHILD="1",
                   ADM_LAUNCHER_START=repr(psutil.Process().create_time()),  # the clock of "[timing] first step"
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get(
                       "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", *argv], env=env,
                                      pass_fds=() if lock_fd is None else (lock_fd,),
                                      preexec_fn=_rank_setup(stop_with_parent(os.getpid()))))
    for s in sorted(forwarded):  # got before or while the ranks started (those started then got it already too:
        forward(s, None)         # a second SIGTERM or SIGUSR2 only sets the same flag)
    codes = wait_all(procs)
    if any(c == EXIT_REQUEUE for c in codes):
        return EXIT_REQUEUE
    if forwarded and all(c in (0, EXIT_REQUEUE) or -c in forwarded for c in codes) and any(codes):
        return EXIT_REQUEUE  # ranks ended by the signal passed on before they could catch it: rerun to resume
    return next((c for c in codes if c != 0), 0)


def _rank_setup(stop_with_launcher):
    """A rank's preexec_fn: it saves and stops if the launcher dies; and the preemption signals stay blocked
    (pending, not lost) across its exec until its first line installs their handler and unblocks them
    (trainer/__main__.py): one forwarded while its interpreter starts would otherwise kill it, and leave
    the other ranks waiting for it."""
    def setup():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR2})
        stop_with_launcher()
    return setup


def wait_all(procs: list, grace_s: float = 30.0) -> list[int]:
    """Exit codes of every rank. When one fails (a crash, the OOM killer, a SIGKILL) the others would wait
    in their next collective for as long as the process group's timeout: they get `grace_s` to end on
    their own (a config error ends every rank), then are killed, and it is said which rank failed."""
    import time

    failed_at = None
    while None in [p.poll() for p in procs]:  # every rank polled (reaped) each time, not up to the first alive
        bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0, EXIT_REQUEUE)]
        if bad and failed_at is None:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            alive = [r for r, p in enumerate(procs) if p.poll() is None]
            print(f"rank {bad[0][0]} exited with code {bad[0][1]}; stopping rank(s) {alive}, which would wait on it "
                  "forever", file=sys.stderr, flush=True)
            for r in alive:
                procs[r].kill()
        time.sleep(0.2)
    return [p.wait() for p in procs]


def _say(message: str) -> None:
    """A warning from the checks every process runs, said once: by the launcher of `--nproc N` (not its
    ranks), else by rank 0 (srun, torchrun, mpiexec)."""
    from .distributed import launch_rank

    if not os.environ.get("ADM_LOCAL_CHILD") and launch_rank() == 0:
        print(message, file=sys.stderr)


def check_data(cfg, world: int = 1) -> None:
    """The data must exist and fit the model (class count) and the world (every rank x loader worker reads
    whole canonical slots, every slot at least one shard), before any process starts or a job is queued."""
    from data_pipeline.verify import check_resolution, read_manifest

    if not cfg.data:
        raise ValueError("data: set the shard directory (adm data write ...)")
    manifest = read_manifest(cfg.data)
    k = manifest["num_classes"]
    if cfg.model.num_classes is not None and cfg.model.num_classes < k:
        raise ValueError(f"model.num_classes: {cfg.data} has {k} classes but the model has {cfg.model.num_classes}; "
                         f"set model.num_classes={k}")
    check_resolution(f"data: {cfg.data}", manifest, cfg.model.image_size, "model.image_size")
    if cfg.model.in_channels != 3:
        raise ValueError(f"model.in_channels: {cfg.data} gives RGB images (3 channels), the model takes "
                         f"{cfg.model.in_channels}")
    if cfg.task == "classifier":
        warn_classifier_crop(cfg, manifest)
    shards = len(manifest["shards"])
    warn_uneven_slots(cfg, manifest)
    warn_damaged_shards(cfg, manifest)
    if cfg.num_slots > shards:
        raise ValueError(f"num_slots: {cfg.num_slots} canonical slots but {cfg.data} has only {shards} shard(s); "
                         f"every slot needs one (write smaller shards with --shard-size, or lower num_slots)")
    readers = world * max(cfg.data_workers, 1)
    if cfg.num_slots % readers:
        raise ValueError(f"num_slots: {cfg.num_slots} canonical slots do not divide over {world} rank(s) x "
                         f"{max(cfg.data_workers, 1)} data_workers = {readers} readers")
    if cfg.val_data:
        check_val_data(cfg, manifest, world)


def warn_uneven_slots(cfg, manifest: dict) -> None:
    """Slots take turns a shard at a time, so where some hold q shards an epoch and others q + 1, the former's
    shards come round (q+1)/q times as often until later epochs deal them elsewhere: said when that is 1.5x
    or more for over a tenth of the data (768 slots over ImageNet's 1,282 shards of 1,000: 2x for 20%)."""
    shards, slots = len(manifest["shards"]), cfg.num_slots
    q, r = divmod(shards, slots)
    short = (slots - r) * q  # shards in the slots holding one fewer
    if q and r and (q + 1) / q >= 1.5 and short > shards / 10:
        size = -(-manifest["num_samples"] // (slots * (q + 1) - 1))  # shards just under a multiple of the slots
        _say(f"warning: num_slots: {cfg.data}'s {shards} shards over {slots} slots: {slots - r} slots hold {q} "
             f"shard(s) an epoch and {r} hold {q + 1}, so {short / shards:.0%} of the images come round "
             f"{(q + 1) / q:.2g}x as often until later epochs reshuffle them; write the data with --shard-size "
             f"{size} (for {slots} slots), or pick a num_slots that divides {shards} more evenly")


def warn_damaged_shards(cfg, manifest: dict) -> None:
    """A shard missing or of another size than the manifest's (a copy cut short) loses its samples every epoch,
    each skipped and counted as it comes round: said once at the start, with the command that checks them all
    (one stat per shard)."""
    bad = []
    for s in manifest["shards"]:
        try:
            size = os.stat(Path(cfg.data) / s["name"]).st_size
        except OSError as e:
            bad.append(f"{s['name']} ({e.strerror.lower()})")
            continue
        if size != s["bytes"]:
            bad.append(f"{s['name']} ({size} bytes, the manifest says {s['bytes']})")
    if bad:
        _say(f"warning: data: {len(bad)} of {len(manifest['shards'])} shards in {cfg.data} are not as written: "
             + ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") + "; their unreadable samples will be skipped "
             f"and counted every epoch (copy them again; `adm data verify {cfg.data}` checks every shard)")


def warn_classifier_crop(cfg, manifest: dict) -> None:
    """ADM's classifier crop scales each image's short side to between R and ceil(R/0.8) and cuts an R x R
    square from it: from shards preprocessed smaller than that it upscales, where ADM crops from the full
    image. Allowed (tiny runs use center-cropped shards), but said."""
    from data_pipeline.preprocess import parse_preprocess

    kind, size = parse_preprocess(manifest.get("preprocess", "none"))
    need = math.ceil(cfg.model.image_size / 0.8)
    if kind != "none" and size < need:
        _say(f"warning: data: {cfg.data} holds images preprocessed with {manifest['preprocess']}; the classifier's "
             f"random-resized crop scales short sides to between {cfg.model.image_size} and {need}, so it will "
             f"upscale them, where ADM crops from the full image: for ADM's augmentation write the shards with "
             f"--preprocess none or max-side:{need} or more")


def check_val_data(cfg, manifest: dict, world: int) -> None:
    """Held-out shards for the classifier's validation: the training data's classes (the same label for the
    same class), the model's resolution, and one shard per rank at least (each rank reads one slot)."""
    from data_pipeline.verify import check_resolution, read_manifest

    if cfg.task != "classifier":
        _say(f"warning: val_data: only the classifier task validates on held-out data; the {cfg.task} task "
             "ignores it")
        return
    val = read_manifest(cfg.val_data)
    if [c["id"] for c in val["classes"]] != [c["id"] for c in manifest["classes"]]:
        raise ValueError(f"val_data: {cfg.val_data} has another class table than data {cfg.data} ({val['num_classes']} "
                         f"classes vs {manifest['num_classes']}): its labels would be scored against the wrong classes; "
                         "write it with the training split's classes (adm data write --split val)")
    check_resolution(f"val_data: {cfg.val_data}", val, cfg.model.image_size, "model.image_size")
    if len(val["shards"]) < world:
        raise ValueError(f"val_data: {cfg.val_data} has {len(val['shards'])} shard(s) for {world} rank(s); each rank "
                         "reads one (write it with a smaller --shard-size)")


def check_gpus(nproc: int) -> None:
    """`--nproc N` on a machine with GPUs starts one rank per GPU: N of them must be visible."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < nproc:
        raise ValueError(f"--nproc {nproc}: this machine shows {gpus} GPU(s), one per rank; use --nproc {gpus}, "
                         "or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU")


def check_precision(precision: str) -> None:
    import torch

    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("precision: fp16 (with its dynamic loss scale) needs a GPU; on a CPU use bf16 or fp32 "
                         "(or auto)")


def check_resume(cfg) -> None:
    """Re-running resumes: the run directory must be a directory, and its newest complete checkpoint
    must have this config's task, architecture and diffusion (named field by field otherwise); a run
    whose checkpoints are all incomplete is refused. Checked before any process starts."""
    from . import checkpoint as ckpt

    run = Path(cfg.run_dir)
    if run.exists() and not run.is_dir():
        raise ValueError(f"run_dir: {run} is a file, expected a directory")
    if (run / "manifest.json").is_file():  # a snapshot's or a dataset's directory, not a run's
        raise ValueError(f"run_dir: {run} holds a manifest.json (a snapshot or a dataset); give a run directory")
    if not run.exists():  # created by the first rank, after DeepSpeed started: what would stop that, said now
        parent = next(p for p in run.absolute().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"run_dir: {run} cannot be created ({parent} is "
                             f"{'not a directory' if not parent.is_dir() else 'not writable'})")
    found = ckpt.resume_point(run)
    refused = found and ckpt.refusal(run, found[0], cfg)
    if refused:
        raise ValueError(refused)
    if not found:
        check_snapshots_without_checkpoints(run, cfg)


def check_snapshots_without_checkpoints(run: Path, cfg) -> None:
    """A run directory with a training's snapshots and no checkpoint (deleted to save space, say): training
    starts again at image 0 and writes its snapshots over those. Refused when they are another training's
    (another task, architecture or diffusion: they would be replaced by a different model's); said when
    they are this one's."""
    from models.snapshot import SnapshotError, read_config

    from .config import describe, fixed_changes

    snaps = []
    for d in sorted((run / "snapshots").glob("img*")):
        try:
            meta = read_config(d)
        except SnapshotError:  # (not ours to judge: a snapshot being written, say)
            continue
        if "training_options" in meta and "posthoc" not in meta:
            snaps.append((meta.get("images", 0), d.name, meta["training_options"]))
    if not snaps:
        return
    _, newest, options = max(snaps)
    changes = fixed_changes({k: options.get(k) for k in ("task", "model", "diffusion")}, cfg)
    if changes:
        raise ValueError(f"run_dir: {run} holds another training's snapshots (up to {newest}: {describe(changes)}) "
                         "and no checkpoint to resume: training here would write over them; use a new run_dir")
    _say(f"run_dir: {run} has snapshots up to {newest} but no checkpoint: training starts again at image 0 and "
         "writes its snapshots over those")


def already_done(cfg) -> str | None:
    """A message when the run's newest complete checkpoint has reached total_kimg already: re-running a
    finished command would otherwise start every rank and DeepSpeed to do nothing."""
    from . import checkpoint as ckpt

    found = ckpt.find_latest(Path(cfg.run_dir))
    total = int(cfg.total_kimg * 1000)
    if found and found[1]["images"] >= total and not ckpt.missed_snapshot(
            Path(cfg.run_dir), found[1]["images"], total, cfg.snapshot_kimg):  # (then it starts, to write it)
        return (f"{cfg.run_dir}: already trained to {found[1]['images'] / 1000:g} kimg ({found[0]}), "
                f"total_kimg={cfg.total_kimg:g}: nothing to do (raise total_kimg to train on)")
    return None


def main(argv: list[str] | None = None, prog: str = "python -m trainer") -> int:
    catch_early()  # a preemption signal during the checks is kept for the ranks (`adm train`'s own process)
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=prog, description="train an ADM diffusion model, noisy classifier or "
                                     "upsampler with DeepSpeed ZeRO; re-running resumes")
    parser.add_argument("config", nargs="?", help="YAML config (or none, with preset=NAME among the overrides)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the config, e.g. total_kimg=64 model.dropout=0.1")
    parser.add_argument("--nproc", type=int, default=1, help="start this many local ranks (CPU: gloo)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come after --nproc
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]

    from .config import load_train_config

    if args.nproc < 1:
        parser.error(f"--nproc: need at least one process, got {args.nproc}")
    cfg = load_train_config(config, overrides)  # bad configs fail here, before any process starts
    from .distributed import launch_world

    world = args.nproc if args.nproc > 1 else launch_world()
    if args.nproc > 1:
        check_gpus(args.nproc)
    check_precision(cfg.precision)
    cfg.batch_layout(world)
    check_data(cfg, world)
    check_resume(cfg)
    done = already_done(cfg) if not os.environ.get("ADM_LOCAL_CHILD") else None
    if done:
        print(done, file=sys.stderr)
        return 0
    # one process, or the launcher before its ranks: stop here. (Ranks of a world stop together at a step
    # boundary: one leaving alone now would leave the others waiting for it.)
    if RECEIVED and (world == 1 or (args.nproc > 1 and "RANK" not in os.environ)):
        _say(f"preempted ({', '.join(sorted(RECEIVED))}) before training started: nothing to save; run the same "
             "command again to resume")
        return EXIT_REQUEUE
    _setup_logging()
    if args.nproc > 1 and "RANK" not in os.environ:
        from .runlock import acquire, held_fd
        acquire(Path(cfg.run_dir))  # held here, and by the ranks it starts
        rest = [a for a in argv if not a.startswith("--nproc")]
        if "--nproc" in argv:
            i = argv.index("--nproc")
            rest = argv[:i] + argv[i + 2:]
        code = launch_local(args.nproc, rest, held_fd(Path(cfg.run_dir)))
    else:
        from .loop import training_loop
        code = training_loop(cfg)
    if code == EXIT_REQUEUE:  # said once, by the launcher or rank 0
        _say("preempted: the state was saved; run the same command again to resume")
    return code
