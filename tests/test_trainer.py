"""The trainer, end to end on CPU: 2 processes (gloo), DeepSpeed ZeRO, real digit images.

Resume, preemption (SIGUSR2) and SIGKILL must all continue bit-for-bit like an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, native_cpu_bf16, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(digit_shards):
    return digit_shards / "train"


BASE = ["preset=tiny-32", "model.num_classes=11", "batch=16", "num_slots=4", "data_workers=1", "status_kimg=0.064",
        "checkpoint_kimg=0.128", "snapshot_kimg=0.128", "model.dropout=0.1"]


def train_cmd(shards, run_dir, *extra, nproc=2):
    return [sys.executable, "-m", "adm", "train", f"data={shards}", f"run_dir={run_dir}", *BASE, *extra,
            "--nproc", str(nproc)]


def train(shards, run_dir, *extra, nproc=2, check=True):
    proc = subprocess.run(train_cmd(shards, run_dir, *extra, nproc=nproc), cwd=REPO, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def final_weights(run_dir):
    snaps = sorted((run_dir / "snapshots").iterdir())
    last = snaps[-1]
    return {name: load_file(str(last / name)) for name in ("model.safetensors", "raw.safetensors")}, last.name


def assert_identical(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}:{k} differs"


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = train(shards, run, "total_kimg=0.384")
    return run, proc


def test_training_runs_logs_and_writes_artifacts(reference_run):
    run, proc = reference_run
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[train]")]
    assert len(lines) == 6 and "img/s" in lines[0] and "s/kimg" in lines[0] and "loss by t quartile" in lines[0]
    assert [line.split()[1:3] for line in lines] == [[f"0.{n:03d}", "kimg"] for n in range(64, 385, 64)]
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert losses[-1] < losses[0]  # it learns
    options = json.loads((run / "training_options.json").read_text())
    assert options["batch"] == 16
    assert options["precision"] == ("bf16" if native_cpu_bf16() else "fp32")  # `auto`, resolved on the rank
    assert options["channels_last"] is False  # off by default: GroupNorm converts NHWC back on GPUs
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "img000000000384"
    from models.snapshot import load_snapshot

    snap = load_snapshot(run / "snapshots" / "img000000000384", hashes=True)
    assert snap.meta["images"] == 384 and snap.config.num_classes == 11
    model = snap.build()
    x = torch.randn(2, 3, 32, 32)
    assert model(x, torch.tensor([1, 500]), torch.tensor([0, 10])).shape == (2, 6, 32, 32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/mse", "train/vb", "train/loss_q0", "train/loss_q3", "train/lr",
                "train/images_per_s", "train/skipped_steps", "train/grad_norm", "train/param_norm",
                "train/maintenance_s", "data/skipped_samples"):
        assert tag in tags, tag
    raw = load_file(str(run / "snapshots" / "img000000000384" / "raw.safetensors"))  # the fp32 masters at the end
    norm = sum(v.double().square().sum() for v in raw.values()).sqrt().item()
    assert acc.Scalars("train/param_norm")[-1].value == pytest.approx(norm, rel=1e-5)
    assert [e.step for e in acc.Scalars("train/loss")] == [64, 128, 192, 256, 320, 384]
    assert "samples/ema" in acc.Tags()["images"]
    from PIL import Image
    grids = sorted((run / "grids").iterdir())
    assert [g.name for g in grids] == ["img000000000128.png", "img000000000256.png", "img000000000384.png"]
    assert Image.open(grids[-1]).size == (4 * 32, 4 * 32)


def test_resume_is_bit_identical(shards, reference_run, tmp_path):
    run = tmp_path / "run"
    # snapshots (and their sample grids) at other times than the reference's must not perturb training
    train(shards, run, "total_kimg=0.192", "snapshot_kimg=0.064")
    proc = train(shards, run, "total_kimg=0.288", "snapshot_kimg=0.064")  # a later end: resumes
    assert "resumed from img000000000192" in proc.stderr
    # resumed twice: the second resume reads the data positions the first resumed run saved
    proc = train(shards, run, "total_kimg=0.384", "snapshot_kimg=0.064")
    assert "resumed from img000000000288" in proc.stderr
    assert_identical(final_weights(run)[0], final_weights(reference_run[0])[0])
    again = train(shards, run, "total_kimg=0.384", "snapshot_kimg=0.064")  # finished: starts no rank
    assert "already trained to 0.384 kimg (img000000000384), total_kimg=0.384: nothing to do" in again.stderr
    assert "[adm.train]" not in again.stderr


def test_preemption_signal_saves_and_the_rerun_is_bit_identical(shards, reference_run, tmp_path):
    run = tmp_path / "run"
    # a checkpoint after every step: the signal always finds the state at that count saved already, and
    # must not save it again (which replaced the directory LATEST names)
    proc = subprocess.Popen(train_cmd(shards, run, "total_kimg=0.384", "checkpoint_kimg=0.016"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    head = []
    for line in proc.stdout:  # wait until training is under way
        head.append(line)
        if line.startswith("[train]"):
            break
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "run the same command again to resume" in err
    saved = (run / "checkpoints" / "LATEST").read_text().strip()
    assert 64 <= int(saved[3:]) < 384
    assert ("".join(head) + out).count(f"[ckpt] saved {saved} ") == 1
    train(shards, run, "total_kimg=0.384")
    assert_identical(final_weights(run)[0], final_weights(reference_run[0])[0])


def test_a_killed_launcher_stops_its_ranks_which_hold_the_lock_until_they_end(shards, tmp_path):
    """`adm train --nproc 2` whose launcher alone is killed (SIGKILL, a closed terminal): its ranks do not
    train on, orphaned, beside a rerun. They hold the run directory's lock with it, are told to stop
    (SIGTERM), save, and end; then the lock is free and the rerun resumes from their checkpoint."""
    import psutil

    from trainer.runlock import holder

    run = tmp_path / "run"
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(train_cmd(shards, run, "total_kimg=4"), cwd=REPO, stdout=out, stderr=out)
    deadline = time.time() + 240
    while "[train]" not in log.read_text():
        assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    ranks = psutil.Process(launcher.pid).children()
    assert len(ranks) == 2
    for r in ranks:  # held still while the lock is looked at (a loaded machine could otherwise see them end first)
        r.suspend()
    launcher.kill()
    launcher.wait()
    assert holder(run) is not None  # the ranks hold it still
    for r in ranks:  # their SIGTERM from the launcher's death is pending: delivered now
        r.resume()
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "the ranks trained on without their launcher"
    assert holder(run) is None
    tag = (run / "checkpoints" / "LATEST").read_text().strip()
    assert 64 <= int(tag.removeprefix("img")) < 4000  # saved when told to stop, far before the end
    proc = train(shards, run, f"total_kimg={(int(tag.removeprefix('img')) + 32) / 1000}")
    assert f"resumed from {tag}" in proc.stderr


def test_a_preemption_signal_while_the_ranks_start_ends_with_the_requeue_status(shards, tmp_path):
    """SIGTERM as `adm train --nproc 2` starts its ranks (still importing, before their handlers): they stop at
    their first step boundary, and the status is 75, "run the same command again", not a silent kill."""
    import psutil

    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shards, run, "total_kimg=0.512"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(psutil.Process(proc.pid).children()) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    assert "run the same command again to resume" in err and "[train]" not in out
    proc = train(shards, run, "total_kimg=0.064")
    assert "nothing to do" in proc.stderr or "resumed from" in proc.stderr or "[train]" in proc.stdout


def test_a_failed_save_is_said_and_nothing_of_it_is_lost_or_kept(shards, tmp_path):
    """A save that fails (a file size limit here, as a full disk) names what failed and the checkpoint that
    is intact; a failed save's leftovers never pass for a later save's files; a snapshot whose write failed
    after its checkpoint was committed (the final one here) is written by the next start, from that
    checkpoint, bit for bit the weights it would have held."""
    import resource
    import shutil

    run = tmp_path / "run"
    stale = run / "checkpoints" / ".tmp-img000000000128" / "ds"  # a save at this count that failed before
    stale.mkdir(parents=True)
    (stale / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"from the failed save")
    train(shards, run, "total_kimg=0.128", "snapshot_kimg=100", nproc=1)
    files = json.loads((run / "checkpoints" / "img000000000128" / "manifest.json").read_text())["files"]
    assert not any("rank_1" in f for f in files), files
    snap = run / "snapshots" / "img000000000128"
    shutil.copytree(snap, tmp_path / "written")
    shutil.rmtree(snap)  # as if its write had failed after the checkpoint's commit
    proc = train(shards, run, "total_kimg=0.128", "snapshot_kimg=100", nproc=1)
    assert "nothing to do" not in proc.stderr and "the snapshot due at 0.128 kimg is missing" in proc.stderr
    for name in ("model.safetensors", "raw.safetensors"):
        a, b = load_file(str(snap / name)), load_file(str(tmp_path / "written" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "nothing to do" in train(shards, run, "total_kimg=0.128", "snapshot_kimg=100", nproc=1).stderr
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # noqa: E731
    proc = subprocess.run(train_cmd(shards, run, "total_kimg=0.256", "snapshot_kimg=100", nproc=1), cwd=REPO,
                          capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode != 0
    assert "saving checkpoint img000000000256 into " in proc.stderr and "failed on rank 0: " in proc.stderr, \
        proc.stderr[-3000:]
    assert "the checkpoint before it (img000000000128) is intact" in proc.stderr
    proc = train(shards, run, "total_kimg=0.256", "snapshot_kimg=100", nproc=1)
    assert "resumed from img000000000128" in proc.stderr
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "img000000000256"


def test_sigkill_at_any_moment_leaves_a_resumable_run(shards, reference_run, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shards, run, "total_kimg=0.384", "checkpoint_kimg=0.064"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("[train]")
        if seen == 3:
            time.sleep(0.3)  # somewhere in the next steps or the save
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    train(shards, run, "total_kimg=0.384", "checkpoint_kimg=0.064")
    assert_identical(final_weights(run)[0], final_weights(reference_run[0])[0])


def test_zero_stages_agree(shards, tmp_path):
    results = {}
    for stage in (1, 2, 3):
        run = tmp_path / f"z{stage}"
        train(shards, run, "total_kimg=0.064", f"zero_stage={stage}", "precision=fp32", "model.dropout=0.0")
        results[stage] = final_weights(run)[0]["raw.safetensors"]
    for stage in (2, 3):
        for k, v in results[1].items():
            torch.testing.assert_close(results[stage][k], v, rtol=1e-4, atol=1e-5, msg=f"stage {stage} {k}")


def test_resume_at_zero_3_is_bit_identical(shards, tmp_path):
    """ZeRO-3 keeps its own fp32 master views (the EMA reads them once, and again after a load): a resumed
    run ends with the same raw weights and EMA as an uninterrupted one. (With deterministic=true, which on a
    CPU must change nothing and have no op warn that it lacks a deterministic kernel.)"""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(shards, straight, "total_kimg=0.256", "zero_stage=3", "deterministic=true")
    train(shards, resumed, "total_kimg=0.128", "zero_stage=3", "deterministic=true")
    proc = train(shards, resumed, "total_kimg=0.256", "zero_stage=3", "deterministic=true")
    assert "resumed from img000000000128" in proc.stderr and "deterministic kernels" in proc.stderr
    assert "does not have a deterministic implementation" not in proc.stderr, proc.stderr[-2000:]
    assert_identical(final_weights(resumed)[0], final_weights(straight)[0])


def test_loss_aware_timesteps_resume_bit_identically(shards, tmp_path):
    """diffusion.schedule_sampler=loss-second-moment: every rank keeps the same loss history (gathered from
    all ranks), saved with the checkpoint; importance sampling is on by the resume, and the resumed run ends
    bit-identical to an uninterrupted one."""
    extra = ("diffusion.schedule_sampler=loss-second-moment", "diffusion.steps=8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(shards, straight, "total_kimg=0.384", *extra)
    train(shards, resumed, "total_kimg=0.192", *extra)
    files = sorted((resumed / "checkpoints" / "img000000000192").glob("rank*.pt"))
    states = [torch.load(f, map_location="cpu", weights_only=False)["sampler"] for f in files]
    assert len(states) == 2 and all(torch.equal(s["history"], states[0]["history"]) for s in states)
    assert states[0]["counts"].tolist() == [10] * 8  # 192 losses over 8 timesteps: every history full
    assert (states[0]["history"] > 0).all()
    proc = train(shards, resumed, "total_kimg=0.384", *extra)
    assert "resumed from img000000000192" in proc.stderr
    assert_identical(final_weights(resumed)[0], final_weights(straight)[0])


def test_classifier_with_validation_resumes_bit_identically(shards, tmp_path):
    """The held-out loader's iterator draws its seed from the global generator: made outside the training's
    draws, a resumed classifier run (dropout on, as in BASE) ends with the same weights as a straight one."""
    extra = ("preset=tiny-classifier-32", f"val_data={shards.parent / 'val'}", "val_batches=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(shards, straight, "total_kimg=0.256", *extra)
    train(shards, resumed, "total_kimg=0.128", *extra)
    proc = train(shards, resumed, "total_kimg=0.256", *extra)
    assert "resumed from img000000000128" in proc.stderr and "| val acc1" in proc.stdout
    last = [run / "snapshots" / "img000000000256" for run in (resumed, straight)]
    assert_identical(*({name: load_file(str(d / name)) for name in ("model.safetensors", "ema_0.9999.safetensors")}
                       for d in last))  # a classifier's main weights are its raw ones


def run_task(shards, run, preset, kimg, status, *extra):
    proc = subprocess.run([sys.executable, "-m", "adm", "train", f"data={shards}", f"run_dir={run}",
                           f"preset={preset}", "model.num_classes=11", "batch=32", "num_slots=4", "data_workers=1",
                           f"status_kimg={status}", f"total_kimg={kimg}", "lr=1e-3", *extra, "--nproc", "2"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("[train]")]


def test_classifier_learns_and_beats_chance_on_held_out_digits(shards, tmp_path):
    lines = run_task(shards, tmp_path / "run", "tiny-classifier-32", 1.536, 0.512, f"val_data={shards.parent / 'val'}")
    loss = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert "acc1 by t quartile" in lines[0]
    assert loss[-1] < loss[0] - 0.05
    val = lines[-1].split("| val ")[1]
    acc1, acc5 = float(val.split("acc1 ")[1].split()[0]), float(val.split("acc5 ")[1].split()[0])
    assert acc1 > 0.15 and acc5 > 0.6  # 11 classes: chance is 0.09 (top-1), 0.45 (top-5)
    # the snapshot guides sampling with the trained weights (ADM's classifier keeps no EMA): its EMA at
    # 0.9999 after 48 steps is still the initialisation, at chance
    from data_pipeline.loader import StreamLoader
    from models.snapshot import load_snapshot

    snap = load_snapshot(tmp_path / "run" / "snapshots" / "img000000001536")
    assert snap.meta["weights"] == "raw" and (snap.path / "ema_0.9999.safetensors").is_file()
    batch = next(iter(StreamLoader(shards.parent / "val", 32, 30, crop="center", flip=False, num_slots=1)))
    t = torch.zeros(len(batch["image"]), dtype=torch.long)
    with torch.no_grad():
        acc = {name: (load_snapshot(snap.path, weights=name).build()(batch["image"], t).argmax(1) == batch["label"])
               .float().mean().item() for name in ("ema", "ema_0.9999")}
    assert acc["ema"] > 0.2 and acc["ema"] > acc["ema_0.9999"] + 0.1, acc  # "ema": the main file


def test_upsampler_learns(shards, tmp_path):
    lines = run_task(shards.parent / "train64", tmp_path / "run", "tiny-upsampler-32-64", 0.512, 0.128)
    loss = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert loss[-1] < loss[0]
    from models.snapshot import load_snapshot

    snap = load_snapshot(tmp_path / "run" / "snapshots" / "img000000000512")
    assert snap.config.arch == "upsampler" and snap.config.small_size == 32


def test_upsampler_learns_on_patches_and_its_snapshot_takes_whole_images(shards, tmp_path):
    """patch_size=32: the 64x64 upsampler trains on 32x32 crops (16x16 low-resolution inputs) and its loss falls;
    the snapshot is the plain model, which upsamples whole 32x32 images and refuses patches."""
    lines = run_task(shards.parent / "train64", tmp_path / "run", "tiny-upsampler-32-64", 0.512, 0.128,
                     "patch_size=32")
    loss = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert len(loss) == 4 and loss[-1] < loss[0]
    from models.snapshot import load_snapshot

    assert json.loads((tmp_path / "run" / "training_options.json").read_text())["patch_size"] == 32
    model = load_snapshot(tmp_path / "run" / "snapshots" / "img000000000512").build("cpu")
    t, y = torch.full((2,), 500), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), t, low_res=torch.randn(2, 3, 32, 32), y=y)
        assert out.shape == (2, 6, 64, 64) and torch.isfinite(out).all()
        with pytest.raises(ValueError, match="expected input of shape"):
            model(torch.randn(2, 3, 32, 32), t, low_res=torch.randn(2, 3, 16, 16), y=y)


def test_elastic_resume_from_2_ranks_to_1(shards, tmp_path):
    """Save at 2 ranks, resume at 1 through DeepSpeed's universal checkpoint: the epoch's samples are
    seen exactly once across both runs, and the EMA carries over (checked against its formula)."""
    run = tmp_path / "run"
    extra = ["log_sample_ids=true", "snapshot_kimg=0.128", "ema_rates=[0.9]"]
    train(shards, run, "total_kimg=0.128", *extra, nproc=2)
    proc = train(shards, run, "total_kimg=0.144", *extra, nproc=1)
    assert "universal checkpoint" in proc.stderr
    changes = [json.loads(x)["changes"] for x in (run / "training_options.changes.jsonl").read_text().splitlines()]
    assert changes[-1]["world_size"] == [2, 1], changes
    before = load_file(str(run / "snapshots" / "img000000000128" / "model.safetensors"))
    after = load_file(str(run / "snapshots" / "img000000000144" / "model.safetensors"))
    raw = load_file(str(run / "snapshots" / "img000000000144" / "raw.safetensors"))
    for k in before:
        torch.testing.assert_close(after[k], 0.9 * before[k] + 0.1 * raw[k], rtol=1e-5, atol=1e-6)
    train(shards, run, "total_kimg=0.512", *extra, nproc=1)
    pairs = [tuple(map(int, line.split())) for f in sorted((run / "sample_ids").iterdir())
             for line in f.read_text().splitlines()]
    assert len(pairs) == 512 and len(set(pairs)) == 512  # nothing consumed twice
    epoch0 = sorted(i for e, i in pairs if e == 0)
    assert epoch0 == list(range(402))  # the whole first epoch, each sample once


def test_resume_at_another_zero_stage_and_precision(shards, tmp_path):
    """Saved at ZeRO-2 in fp32, resumed at ZeRO-1 in bf16 through the universal checkpoint: the fp32 master
    weights, the optimizer state and the EMA carry over (one Adam step moves the weights by about the learning
    rate; the EMA follows its formula)."""
    run = tmp_path / "run"
    extra = ["snapshot_kimg=0.128", "ema_rates=[0.9]", "grid=false"]
    train(shards, run, "total_kimg=0.128", "zero_stage=2", "precision=fp32", *extra)
    proc = train(shards, run, "total_kimg=0.144", "zero_stage=1", "precision=bf16", *extra)
    assert "(saved at ZeRO stage 2, now 1; precision fp32, now bf16: universal checkpoint)" in proc.stderr
    before = load_file(str(run / "snapshots" / "img000000000128" / "model.safetensors"))
    raw_before = load_file(str(run / "snapshots" / "img000000000128" / "raw.safetensors"))
    after = load_file(str(run / "snapshots" / "img000000000144" / "model.safetensors"))
    raw = load_file(str(run / "snapshots" / "img000000000144" / "raw.safetensors"))
    for k in before:
        torch.testing.assert_close(after[k], 0.9 * before[k] + 0.1 * raw[k], rtol=1e-5, atol=1e-6)
    moved = max((raw[k] - raw_before[k]).abs().max().item() for k in raw)
    assert 0 < moved < 0.01  # one step at lr 2e-4 (here about 1 lr): continued from the saved weights, not new ones


def test_power_ema_profiles_and_posthoc_reconstruction(shards, tmp_path):
    run = tmp_path / "run"
    train(shards, run, "total_kimg=0.256", "snapshot_kimg=0.064", "power_ema=[0.05,0.15]", "grid=false")
    final = run / "snapshots" / "img000000000256"
    assert (final / "phema_0.05.safetensors").is_file() and (final / "phema_0.15.safetensors").is_file()
    proc = subprocess.run([sys.executable, "-m", "adm", "posthoc", str(run), "--sigma-rel", "0.05"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from models.snapshot import load_snapshot

    synth = load_snapshot(run / "snapshots" / "img000000000256-posthoc-0.050")
    stored = load_file(str(final / "phema_0.05.safetensors"))
    for k, v in stored.items():  # a stored width is reproduced by the least-squares weights
        torch.testing.assert_close(synth.state_dict[k], v, rtol=1e-4, atol=1e-5)
    synth.build()
    run_cli("posthoc", str(run), "--sigma-rel", "0.0704")  # a width that 3 decimals would merge with 0.070
    assert (run / "snapshots" / "img000000000256-posthoc-0.0704").is_dir()
    (run / "snapshots" / "img000000000320").mkdir()  # a snapshot being written: ignored unless asked for
    for args, message in [(["--at", "img000000000320"], "img000000000320 is not a complete snapshot"),
                          (["--at", "img000000000256-posthoc-0.050"], "--at img000000000256-posthoc-0.050: not a "
                           "training snapshot (a post-hoc one holds no profiles); give the one it was made from, "
                           "img000000000256"),
                          ([], "phema_0.15.safetensors: size 1000 != "),  # a damaged one: refused
                          (["--run", "x"], "unrecognized arguments")]:
        if not args:
            os.truncate(run / "snapshots" / "img000000000128" / "phema_0.15.safetensors", 1000)
        proc = run_cli("posthoc", str(run), "--sigma-rel", "0.1", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_cli("posthoc", str(tmp_path / "nope"), "--sigma-rel", "0.1", check=False)
    assert proc.returncode == 2 and "nope: no such run directory" in proc.stderr


def test_checkpoints_load_with_deepspeeds_zero_to_fp32(reference_run, tmp_path):
    run, _ = reference_run
    tag = run / "checkpoints" / "img000000000384"
    proc = subprocess.run([sys.executable, str(tag / "zero_to_fp32.py"), str(tag), str(tmp_path / "fp32"), "--tag",
                           "ds", "--safe_serialization"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    consolidated = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    raw = load_file(str(run / "snapshots" / "img000000000384" / "raw.safetensors"))
    assert consolidated.keys() == raw.keys()
    for k in raw:
        assert torch.equal(consolidated[k].float(), raw[k])


def test_mpiexec_launch_matches_the_local_launcher(shards, reference_run, tmp_path):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    run = tmp_path / "run"
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "trainer", f"data={shards}", f"run_dir={run}", *BASE,
           "total_kimg=0.384"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical(final_weights(run)[0], final_weights(reference_run[0])[0])


def test_bad_inputs_fail_fast_with_clear_errors(shards, reference_run, tmp_path):
    run, _ = reference_run
    (tmp_path / "afile").write_text("")
    broken = tmp_path / "broken" / "checkpoints" / "img000000000064"
    broken.mkdir(parents=True)  # a save that never committed, and nothing complete beside it
    fits = [f"data={shards}", *BASE[2:]]  # every other setting fits the data and the world
    cases = [
        (["data=" + str(tmp_path), "run_dir=" + str(tmp_path / "r")], "no manifest.json"),
        ([f"data={shards}", f"run_dir={tmp_path / 'r'}", "batch=15"], "not divisible by the world size 2"),
        ([f"data={shards}", f"run_dir={tmp_path / 'r'}", "preset=tiny-32"], "set model.num_classes=11"),
        ([*fits, f"run_dir={tmp_path / 'afile'}"], f"run_dir: {tmp_path / 'afile'} is a file"),
        ([*fits, f"run_dir={tmp_path / 'r'}", "num_slots=0"], "num_slots must be at least 1"),
        ([*fits, f"run_dir={tmp_path / 'r'}", "model.image_size=64"],
         "images center-cropped to 32x32 (center-crop:32), smaller than model.image_size=64"),
        ([*fits, f"run_dir={tmp_path / 'broken'}"],
         "no complete checkpoint to resume from (img000000000064: no manifest.json"),
        ([*fits, f"run_dir={run}", "model.model_channels=64"],  # refused before ranks start
         "(model.model_channels: 32 in the run, 64 now): the task, the architecture"),
        ([*fits, f"run_dir={tmp_path / 'r'}", "--nproc", "0"], "--nproc: need at least one process"),
        ([*fits, f"run_dir={tmp_path / 'r'}", "model.in_channels=1"], "gives RGB images (3 channels), the model takes 1"),
        ([*fits, f"run_dir={run / 'snapshots' / 'img000000000384'}"], "holds a manifest.json (a snapshot or a dataset)"),
    ]
    for args, expected in cases:
        cmd = [sys.executable, "-m", "adm", "train", "preset=tiny-32", "model.num_classes=11", *args]
        if "preset=tiny-32" in args:
            cmd.remove("model.num_classes=11")
        if "--nproc" not in args:
            cmd += ["--nproc", "2"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and expected in proc.stderr, (expected, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr and "[adm.train]" not in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "r").exists() and sorted(p.name for p in (tmp_path / "broken").rglob("*")) == [
        "checkpoints", "img000000000064"]  # nothing was started, nothing written


def test_non_finite_steps_are_skipped_then_training_stops(shards, tmp_path):
    """A checkpoint every step and keep_last=1: the ones saved during the non-finite streak do not prune the
    last one saved before it, which the message names."""
    import re

    proc = train(shards, tmp_path / "run", "total_kimg=1.0", "lr=1e30", "max_bad_steps=3", "checkpoint_kimg=0.016",
                 "keep_last=1", "precision=fp32", check=False)
    assert proc.returncode == 2
    assert "3 non-finite steps in a row" in proc.stderr and "last good checkpoint is" in proc.stderr
    good = re.search(r"last good checkpoint is \S*(img\d{12})", proc.stderr).group(1)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("img*"))
    assert "non-finite steps in a row so far: every older checkpoint is kept" in proc.stdout
    assert kept[0] == good and len(kept) == 3, (good, kept)  # the good one and the two saved in the streak
    # the skip counters are the run's, not the launch's: kept in client.json, carried on by a resume (here from
    # the newest, which resumes the streak: every status line after it counts on from 2)
    counted = [json.loads((tmp_path / "run" / "checkpoints" / k / "client.json").read_text())["counted"] for k in kept]
    assert [c["skipped_steps"] for c in counted] == [0, 1, 2], counted
    (tmp_path / "run" / "checkpoints" / "LATEST").write_text(kept[2] + "\n")
    proc = train(shards, tmp_path / "run", "total_kimg=1.0", "lr=1e30", "max_bad_steps=3", "checkpoint_kimg=0.016",
                 "keep_last=1", "precision=fp32", "status_kimg=0.016", check=False)
    shown = [int(n) for n in re.findall(r"skipped steps (\d+)", proc.stdout)]
    assert proc.returncode == 2 and shown and shown[0] == 3 and shown == sorted(shown), (shown, proc.stdout[-2000:])
