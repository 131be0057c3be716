"""Trainer pieces without processes: config, batch layout, EMA formula, checkpoint discovery, rank discovery."""

import json
import signal
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import native_cpu_bf16, run_cli
from trainer import checkpoint as ckpt
from trainer.config import TRAIN_PRESETS, load_train_config, resolve_precision
from trainer.distributed import MPI_MARKERS, discover, expand_nodelist
from trainer.ema import ShardEMA


def test_presets_carry_the_papers_hyperparameters():
    c = load_train_config(None, ["preset=adm-64"])
    assert (c.batch, c.lr, c.model.dropout, c.diffusion.noise_schedule, c.total_kimg) == (2048, 3e-4, 0.1, "cosine",
                                                                                          540_000 * 2048 / 1000)
    c = load_train_config(None, ["preset=classifier-128"])
    assert (c.task, c.batch, c.lr, c.weight_decay, c.lr_decay, c.model.num_res_blocks) == (
        "classifier", 256, 3e-4, 0.05, True, 2)
    for size in (64, 256, 512):  # the same recipe (Table 12), annealed as the published 128 one
        assert load_train_config(None, [f"preset=classifier-{size}"]).lr_decay
    c = load_train_config(None, ["preset=upsampler-64-256", "model.dropout=0.1"])
    assert c.task == "upsampler" and c.model.small_size == 64 and c.model.dropout == 0.1
    c = load_train_config(None, ["preset=adm-256-uncond"])  # Table 4: 2M iterations at batch 256
    assert (c.batch, c.lr, c.model.class_cond, c.model.num_classes, c.total_kimg) == (256, 1e-4, False, None, 512_000)
    assert set(TRAIN_PRESETS) >= {"adm-128", "adm-256", "adm-256-uncond", "adm-512", "classifier-64",
                                  "upsampler-128-512"}
    from models.presets import PRESETS  # every model preset (every published model) can be trained
    assert set(PRESETS) <= set(TRAIN_PRESETS), set(PRESETS) - set(TRAIN_PRESETS)


def test_batch_layout_and_errors():
    c = load_train_config(None, ["preset=tiny-32", "batch=64", "micro_batch=8"])
    assert c.batch_layout(2) == (8, 4) and c.batch_layout(8) == (8, 1)
    with pytest.raises(ValueError, match="batch: the global batch 64 is not divisible by the world size 3"):
        c.batch_layout(3)
    with pytest.raises(ValueError, match="micro_batch: 8 does not divide the per-rank batch 4"):
        c.batch_layout(16)
    for bad, match in [(["preset=tiny-32", "zero_stage=4"], "zero_stage"), (["preset=tiny-32", "task=gan"], "task"),
                       (["preset=tiny-32", "task=classifier"], "model.arch"), (["preset=nope"], "unknown training preset"),
                       (["preset=tiny-32", "lr=fast"], "bad value for 'lr'"),
                       # nan passes every "< 0" check as if off; inf overflows the image count
                       (["preset=tiny-32", "total_kimg=inf"], "total_kimg: must be a finite number, got inf"),
                       (["preset=tiny-32", "grad_clip=nan"], "grad_clip: must be a finite number, got nan"),
                       (["preset=tiny-32", "seed=-1"], r"seed: must lie in \[0, 2\^63\), got -1"),
                       (["preset=tiny-32", "seed=99999999999999999999"], "seed: must lie in"),
                       (["preset=tiny-32", "model.model_channels=0"], "model.model_channels: must be at least 1"),
                       (["preset=tiny-32", "model.num_res_blocks=-1"], "model.num_res_blocks: must be at least 1")]:
        with pytest.raises(ValueError, match=match):
            load_train_config(None, bad)


def test_fixed_hash_ignores_memory_knobs_and_dropout_only():
    a = load_train_config(None, ["preset=tiny-32"])
    assert a.fixed_hash() == load_train_config(None, ["preset=tiny-32", "model.use_checkpoint=true", "lr=1",
                                                      "model.dropout=0.3", "norm_fp32=false"]).fixed_hash()
    assert a.norm_fp32 is True  # ADM's float32 norms unless asked
    assert a.fixed_hash() != load_train_config(None, ["preset=tiny-32", "model.model_channels=64"]).fixed_hash()


def test_precision_and_channels_last_follow_the_device():
    assert load_train_config(None, ["preset=tiny-32"]).precision == "auto"
    expected = "bf16" if native_cpu_bf16() else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, torch.device("cpu")) == p
    with pytest.raises(ValueError, match="precision"):
        load_train_config(None, ["preset=tiny-32", "precision=bfloat16"])
    assert load_train_config(None, ["preset=tiny-32"]).channels_last is False  # GroupNorm undoes it on GPUs
    assert load_train_config(None, ["preset=tiny-32", "channels_last=true"]).channels_last is True


class FakeEngine:
    """Enough of a DeepSpeed engine for ShardEMA at ZeRO-1/2: one flat fp32 master partition."""

    class Opt:
        def __init__(self, flat):
            self.single_partition_of_fp32_groups = [flat]

    def __init__(self, flat):
        self.optimizer = FakeEngine.Opt(flat)


def test_ema_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(30)]
    master = weights[0].clone()
    ema = ShardEMA(FakeEngine(master), [0.9, 0.5], zero_stage=2)
    expected = {0.9: weights[0].clone(), 0.5: weights[0].clone()}
    for w in weights[1:]:
        master.copy_(w)
        ema.update()
        for r in expected:
            expected[r] = r * expected[r] + (1 - r) * w
    for r in expected:
        torch.testing.assert_close(ema.shadows[r][0], expected[r], rtol=1e-12, atol=1e-12)
    state = ema.state_dict()
    other = ShardEMA(FakeEngine(master.clone()), [0.9, 0.5], zero_stage=2)
    other.load_state_dict(state)
    assert torch.equal(other.shadows[0.9][0], ema.shadows[0.9][0]) and other.updates == 29
    with pytest.raises(ValueError, match="EMA rates"):
        ShardEMA(FakeEngine(master.clone()), [0.99], zero_stage=2).load_state_dict(state)


def make_ckpt(run, images, files=("a.pt", "b.pt"), world=2):
    tag = ckpt.tag_for(images)
    tmp = ckpt.tmp_dir(run, tag)
    tmp.mkdir(parents=True)
    for f in files:
        (tmp / f).write_bytes(b"x" * (images + 1))
    ckpt.commit(run, tag, world)
    return tag


def test_a_commit_killed_between_its_renames_is_finished_before_discovery(tmp_path):
    """Saving an image count that exists (after a rollback) moves the old checkpoint aside, then renames the
    new one in: killed between the two, the tag is missing and prune would delete both. The new one goes in
    place when complete, else the old one comes back."""
    run = tmp_path
    make_ckpt(run, 100)
    tag = make_ckpt(run, 200)
    root = run / "checkpoints"
    for new_complete in (False, True):
        before = (root / tag / "a.pt").read_bytes()
        os.replace(root / tag, root / f".tmp-old-{tag}")  # the state between the renames
        new = ckpt.tmp_dir(run, tag)
        new.mkdir()
        (new / "a.pt").write_bytes(b"new")
        if new_complete:
            ckpt.write_json_atomic(new / ckpt.MANIFEST, {"tag": tag, "images": 200, "world_size": 2,
                                                          "files": {"a.pt": 3}})
        assert ckpt.find_latest(run)[0] != tag  # not found as it is
        [line] = ckpt.finish_interrupted_commits(run)
        assert ("the new" if new_complete else "the old") in line
        assert ckpt.find_latest(run)[0] == tag
        assert (root / tag / "a.pt").read_bytes() == (b"new" if new_complete else before)
        ckpt.prune(run, keep_last=5, keep_every_images=0)  # the leftovers go
        assert not list(root.glob(".tmp-*")) and ckpt.finish_interrupted_commits(run) == []


def test_checkpoint_discovery_skips_partial_and_corrupt(tmp_path):
    run = tmp_path
    assert ckpt.find_latest(run) is None
    first = make_ckpt(run, 100)
    second = make_ckpt(run, 200)
    assert ckpt.find_latest(run)[0] == second
    (run / "checkpoints" / second / "b.pt").write_bytes(b"short")  # corrupt: size differs
    assert ckpt.find_latest(run)[0] == first
    # an interrupted save: a tmp dir and a directory without manifest are both ignored
    ckpt.tmp_dir(run, ckpt.tag_for(300)).mkdir()
    (run / "checkpoints" / ckpt.tag_for(400)).mkdir()
    (run / "checkpoints" / "LATEST").write_text(ckpt.tag_for(400))
    tag, manifest = ckpt.find_latest(run)
    assert tag == first and manifest["world_size"] == 2 and set(manifest["files"]) == {"a.pt", "b.pt"}


def test_a_count_committed_again_replaces_the_old_directory_whole(tmp_path, monkeypatch):
    """A run rolled back to an older LATEST reaches a count it saved before: the new state replaces the
    old one, which is moved aside (never deleted before the new one is in place) and then removed."""
    tag = make_ckpt(tmp_path, 100, files=("a.pt",))
    moves = []
    real_replace = ckpt.os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (moves.append((Path(a).name, Path(b).name)),
                                                           real_replace(a, b))[1])
    tmp = ckpt.tmp_dir(tmp_path, tag)
    tmp.mkdir()
    (tmp / "c.pt").write_bytes(b"new")
    ckpt.commit(tmp_path, tag, 1)
    assert moves[1:3] == [(tag, f".tmp-old-{tag}"), (f".tmp-{tag}", tag)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", tag]
    assert set(ckpt.valid(tmp_path, tag)["files"]) == {"c.pt"} and ckpt.find_latest(tmp_path)[0] == tag


def test_prune_keeps_last_and_every(tmp_path):
    for i in range(1, 7):
        make_ckpt(tmp_path, i * 100)
    ckpt.prune(tmp_path, keep_last=2, keep_every_images=200)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("img"))
    assert left == [ckpt.tag_for(i) for i in (200, 400, 500, 600)]
    assert json.loads((tmp_path / "checkpoints" / ckpt.tag_for(600) / "manifest.json").read_text())["images"] == 600


def test_keep_every_keeps_the_first_checkpoint_at_or_past_each_multiple(tmp_path):
    """Checkpoints fall where a step crosses checkpoint_kimg (multiples of the batch), seldom on a multiple of
    keep_every_kimg itself: one is kept per interval all the same, the first at or past its start, and the
    choice holds as later checkpoints come (batch 16, checkpoint_kimg 0.1, keep_every_kimg 0.2)."""
    counts = (112, 208, 304, 400, 512, 608, 640)
    for n in counts:
        make_ckpt(tmp_path, n, files=("a.pt",))
        ckpt.prune(tmp_path, keep_last=1, keep_every_images=200, keep=ckpt.tag_for(n))
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("img"))
    # the oracle: for each multiple of 200 up to the last count, the smallest count at or past it
    firsts = {min(n for n in counts if n >= k) for k in range(200, max(counts) + 1, 200)}
    assert left == [ckpt.tag_for(n) for n in sorted(firsts | {640})] == [ckpt.tag_for(n) for n in (208, 400, 608, 640)]



def test_a_resume_says_what_it_skipped_and_refuses_when_nothing_is_complete(tmp_path):
    """Skipped checkpoints are named with the reason; a run whose checkpoints are all incomplete is
    refused (starting again from image 0 in their directory would mix two runs, and pruning by name
    would then delete the new checkpoint and keep the broken ones)."""
    run = tmp_path
    first, second = make_ckpt(run, 100), make_ckpt(run, 200)
    (run / "checkpoints" / second / "b.pt").write_bytes(b"short")
    skipped = []
    assert ckpt.resume_point(run, skipped)[0] == first
    assert skipped == [f"{second}: b.pt is 5 bytes, manifest.json says 201 (LATEST named it)"]
    (run / "checkpoints" / first / "a.pt").unlink()
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.resume_point(run)
    assert f"{first}: a.pt missing" in str(e.value) and f"{second}: b.pt is 5 bytes" in str(e.value)
    assert str(run / "checkpoints") in str(e.value)
    empty = tmp_path / "fresh"
    assert ckpt.resume_point(empty) is None  # a new run: nothing to resume, nothing to refuse


def test_prune_never_deletes_the_new_checkpoint_for_broken_newer_ones(tmp_path):
    """A run resumed from img300 because img500 and img600 are damaged: the saves that follow are kept
    (only complete checkpoints count towards keep_last); the damaged ones stay for the user to inspect."""
    for i in (1, 2, 3, 5, 6):
        make_ckpt(tmp_path, i * 100)
    for i in (5, 6):
        (tmp_path / "checkpoints" / ckpt.tag_for(i * 100) / "manifest.json").unlink()
    new = make_ckpt(tmp_path, 400)
    ckpt.prune(tmp_path, keep_last=2, keep_every_images=0, keep=new)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("img"))
    assert left == [ckpt.tag_for(i) for i in (300, 400, 500, 600)]
    assert ckpt.find_latest(tmp_path)[0] == new


def test_a_resume_names_the_fields_it_cannot_change_and_records_those_it_may(tmp_path):
    """The refusal names each changed field of the task, architecture or diffusion (from the checkpoint's
    own record, or for older checkpoints from training_options.json); allowed changes (the learning
    rate) are kept in training_options.changes.jsonl, so the original options are not lost."""
    from dataclasses import asdict

    from trainer.cli import check_resume
    from trainer.loop import write_options

    def config(*extra):
        return load_train_config(None, ["preset=tiny-32", f"run_dir={tmp_path}", *extra])

    cfg = config()
    tag = make_ckpt(tmp_path, 100)
    client = tmp_path / "checkpoints" / tag / "client.json"
    want = "(diffusion.noise_schedule: 'cosine' in the run, 'linear' now; model.model_channels: 32 in the run, 64 now)"
    for record in ({"fixed_hash": cfg.fixed_hash(), "fixed": cfg.fixed()}, {"fixed_hash": cfg.fixed_hash()}):
        client.write_text(json.dumps(record))
        write_options(tmp_path, asdict(cfg), None)
        check_resume(cfg)
        check_resume(config("lr=1", "model.use_checkpoint=true"))
        with pytest.raises(ValueError) as e:
            check_resume(config("model.model_channels=64", "diffusion.noise_schedule=linear"))
        assert f"{tag} was trained with settings a resume cannot change {want}" in str(e.value)
    # ZeRO stage 1 <-> 2 converts through the universal checkpoint; DeepSpeed's cannot reach or leave stage 3
    client.write_text(json.dumps({"fixed_hash": cfg.fixed_hash(), "fixed": cfg.fixed(), "zero_stage": 2}))
    check_resume(config("zero_stage=1", "precision=fp32"))
    with pytest.raises(ValueError, match="saved at ZeRO stage 2: DeepSpeed's universal checkpoint converts between "
                                         "stages 1 and 2 but not to or from stage 3"):
        check_resume(config("zero_stage=3"))
    # what the saved state is laid out by: refused before the ranks start, not by DeepSpeed or the loader
    for extra, named in [("ema_rates=[0.9999,0.99]", "ema_rates: [0.9999] in the run, [0.9999, 0.99] now"),
                         ("power_ema=[0.05]", "power_ema: [] in the run, [0.05] now"),
                         ("num_slots=8", "num_slots: 64 in the run, 8 now"), ("seed=3", "seed: 0 in the run, 3 now")]:
        with pytest.raises(ValueError, match=re.escape(named)):
            check_resume(config(extra))
    # a checkpoint recorded by an older version: fewer fields, and its hash covered dropout: compared field by field
    old_fixed = {k: v for k, v in cfg.fixed().items() if k in ("task", "model", "diffusion")}
    old_fixed["model"]["dropout"] = 0.0
    client.write_text(json.dumps({"fixed_hash": "0123456789abcdef", "fixed": old_fixed}))
    check_resume(config("model.dropout=0.1", "seed=3"))
    with pytest.raises(ValueError, match="model.model_channels: 32 in the run, 64 now"):
        check_resume(config("model.model_channels=64"))
    changes = tmp_path / "training_options.changes.jsonl"
    assert not changes.exists()
    write_options(tmp_path, asdict(config("lr=1")), 100)
    write_options(tmp_path, asdict(config("lr=1")), 200)  # nothing new: nothing recorded
    [line] = changes.read_text().splitlines()
    assert json.loads(line)["images"] == 100 and json.loads(line)["changes"] == {"lr": [2e-4, 1.0]}
    assert json.loads((tmp_path / "training_options.json").read_text())["lr"] == 1.0
    # the world size, recorded beside the options from now on: a change is kept too (an older file has none)
    write_options(tmp_path, {**asdict(config("lr=1")), "world_size": 2}, 300)
    write_options(tmp_path, {**asdict(config("lr=1")), "world_size": 1}, 400)
    assert [json.loads(x)["changes"] for x in changes.read_text().splitlines()[1:]] == [{"world_size": [2, 1]}]

def test_rank_discovery(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SUBMITIT_LOCAL_NTASKS",
              "MASTER_PORT", "MASTER_ADDR", "SLURM_STEP_NODELIST", "SLURM_STEP_ID", *MPI_MARKERS):
        monkeypatch.delenv(k, raising=False)
    assert discover().source == "single"
    monkeypatch.setenv("SLURM_PROCID", "0")  # a batch script's own shell (sbatch -n 8): no task of a step
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    assert (discover().source, discover().world_size) == ("single", 1)
    monkeypatch.setenv("SLURM_PROCID", "3")  # task 3 of an srun step of 8
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    env = discover()
    assert (env.source, env.rank, env.world_size, env.local_rank, env.master_addr) == ("slurm", 3, 8, 1, "gpu07")
    assert env.master_port == 10000 + 1234  # below the ephemeral ports (32768-)
    monkeypatch.setenv("PMI_FD", "11")  # srun --mpi=pmi2 (a site's MpiDefault): still Slurm's ranks, MPI not started
    monkeypatch.setenv("PMIX_RANK", "3")
    monkeypatch.setattr("trainer.distributed._mpi_env", lambda: pytest.fail("MPI started in an srun step"))
    assert discover().source == "slurm"
    # a step on part of the allocation (srun -N2 -r2 in a 4-node job): the step's first node, a port of its own
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[09-10]")
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    env = discover()
    assert (env.master_addr, env.master_port) == ("gpu09", 10000 + (1234 + 7919) % 20000)
    monkeypatch.setenv("SLURM_STEP_ID", "4294967291")  # the batch script's own step
    assert discover().master_port == 10000 + 1234
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "PMI_FD", "PMIX_RANK"):
        monkeypatch.delenv(k)
    # submitit's local executor: N tasks of one job on this machine, a port from the job (controller pid)
    for k, v in dict(SUBMITIT_LOCAL_NTASKS="2", SUBMITIT_LOCAL_GLOBALID="1", SUBMITIT_LOCAL_LOCALID="1",
                     SUBMITIT_LOCAL_JOB_ID="4242").items():
        monkeypatch.setenv(k, v)
    env = discover()
    assert (env.source, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        "submitit-local", 1, 2, 1, "127.0.0.1", 14242)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert discover().source == "torchrun"
    assert expand_nodelist("a[01-03,10],b5,c[7]") == ["a01", "a02", "a03", "a10", "b5", "c7"]
    assert expand_nodelist("rack[0-1]-n[08-09].x,gpu9") == ["rack0-n08.x", "rack0-n09.x", "rack1-n08.x",
                                                           "rack1-n09.x", "gpu9"]


def test_launch_world_gpu_choice_and_rank0_address(monkeypatch):
    """The world size announced by each launcher (the checks before the ranks start use it), the GPU of a
    rank (one GPU bound per task shows as cuda:0), and rank 0's address (not Debian's 127.0.1.1)."""
    import socket

    from trainer.distributed import gpu_index, host_address, launch_world

    for k in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SUBMITIT_LOCAL_NTASKS", "SLURM_NTASKS",
              "SLURM_PROCID", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "3")  # a shell inside `salloc -n 3`: one process, not a task of srun
    monkeypatch.setenv("WORLD_SIZE", "5")  # without RANK: not a launcher's
    assert launch_world() == 1
    monkeypatch.setenv("SLURM_PROCID", "0")  # a batch script's own shell (sbatch -n 3): still one process
    assert launch_world() == 1
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")  # a task of srun -n 3
    assert launch_world() == 3
    for k in ("SUBMITIT_LOCAL_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.setenv(k, str(len(k)))  # each launcher's own variable wins over Slurm's
        assert launch_world() == len(k)
    monkeypatch.setenv("RANK", "0")
    assert launch_world() == 5
    assert [gpu_index(r, 8) for r in (0, 7)] == [0, 7] and gpu_index(5, 1, bound=True) == 0
    with pytest.raises(RuntimeError, match="local rank 4 but this node shows 2 GPU"):
        gpu_index(4, 2)
    with pytest.raises(RuntimeError, match="local rank 1 but this node shows 1 GPU"):
        gpu_index(1, 1)  # two ranks on one GPU (torchrun on a 1-GPU machine): NCCL would refuse it later
    from trainer.distributed import bound_one_gpu_per_task

    monkeypatch.delenv("SLURM_GPUS_PER_TASK", raising=False)
    for visible, bound in ((None, False), ("", False), ("3", True), ("0,1", False)):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert bound_one_gpu_per_task() is bound, visible  # unset: not bound (two tasks on a 1-GPU node must fail)
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "1")
    assert bound_one_gpu_per_task()
    monkeypatch.delenv("SLURM_PROCID")
    assert not bound_one_gpu_per_task()  # not a task of srun
    from trainer.cli import check_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--nproc 2: this machine shows 1 GPU"):
        check_gpus(2)
    check_gpus(1)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a: [(2, 1, 6, "", ("127.0.1.1", 0)), (2, 1, 6, "", ("10.1.2.3", 0))])
    assert host_address() == "10.1.2.3"
    monkeypatch.setenv("MASTER_ADDR", "head")
    assert host_address() == "head"


def test_shipped_train_configs_load():
    from conftest import REPO
    files = sorted((REPO / "configs" / "train").glob("*.yaml"))
    assert files
    for f in files:
        load_train_config(str(f), [])


def test_saves_skip_the_zip_crc_and_restore_the_setting(tmp_path):
    """torch.load ignores the CRC, so checkpoints skip computing it; the global setting comes back after."""
    import zipfile

    from torch.utils.serialization import config

    state = {"w": torch.arange(1000, dtype=torch.float32)}
    with pytest.raises(KeyError), ckpt.without_zip_crc():
        torch.save(state, tmp_path / "a.pt")
        raise KeyError("a failing save")
    assert config.save.compute_crc32 is True
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], state["w"])
    assert zipfile.ZipFile(tmp_path / "a.pt").testzip() is not None  # no CRC was written
    torch.save(state, tmp_path / "b.pt")
    assert zipfile.ZipFile(tmp_path / "b.pt").testzip() is None


def test_data_that_cannot_feed_the_world_is_refused_before_start(digit_shards):
    """Every slot needs a shard, and the slots must divide over ranks x loader workers: both checked
    (naming the field and the numbers) before any process starts, by `adm train` and `adm submit train`."""
    from conftest import run_cli

    from data_pipeline.verify import read_manifest
    from trainer.cli import check_data

    data = digit_shards / "train"
    shards = len(read_manifest(data)["shards"])
    base = ["preset=tiny-32", "model.num_classes=11", f"data={data}"]
    cfg = load_train_config(None, base + [f"num_slots={shards + 1}"])
    with pytest.raises(ValueError, match=f"num_slots: {shards + 1} canonical slots but .* only {shards} shard"):
        check_data(cfg, 1)
    cfg = load_train_config(None, base + ["num_slots=2", "data_workers=2"])
    check_data(cfg, 1)
    with pytest.raises(ValueError, match=r"num_slots: 2 canonical slots do not divide over 2 rank\(s\) x 2 data_workers"):
        check_data(cfg, 2)
    proc = run_cli("train", *base, "num_slots=2", "data_workers=2", "--nproc", "2", check=False)
    assert proc.returncode != 0 and "do not divide over 2 rank(s)" in proc.stderr and "[train]" not in proc.stdout


def test_deepspeed_ops_are_built_inside_this_environment(tmp_path, monkeypatch):
    """DeepSpeed's just-in-time ops go to sys.prefix/torch_extensions (built there by scripts/setup.sh), not to
    the user-wide ~/.cache shared with other environments; a TORCH_EXTENSIONS_DIR already set wins, and
    an environment that cannot be written keeps torch's default."""
    import os
    import subprocess
    import sys

    from trainer.distributed import ops_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert ops_dir() == str(tmp_path / "torch_extensions") == os.environ["TORCH_EXTENSIONS_DIR"]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    assert ops_dir() == "/elsewhere"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    tmp_path.chmod(0o500)
    try:
        if not os.access(tmp_path, os.W_OK):  # root writes anywhere: nothing to check then
            assert ops_dir() is None and "TORCH_EXTENSIONS_DIR" not in os.environ
    finally:
        tmp_path.chmod(0o700)
    monkeypatch.undo()

    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    code = ("import shutil; from trainer.distributed import build_cpu_ops, ops_dir; "
            "print(build_cpu_ops(), ops_dir(), shutil.which('ninja'))")
    bindir = str(Path(sys.executable).parent)
    plain = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != bindir)
    built = []
    # run as `.venv/bin/adm` (bin not on PATH: a system ninja may come first) and from an activated
    # environment: the same ninja builds, so the second finds the op built and does not rebuild it
    for path in (plain, os.pathsep.join([bindir, plain])):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "PATH": path}, capture_output=True, text=True,
                             check=True)
        name, where, ninja = out.stdout.split()[-3:]
        assert where == os.path.join(sys.prefix, "torch_extensions")
        if (Path(bindir) / "ninja").is_file():
            assert ninja == str(Path(bindir) / "ninja")
        [so] = Path(where).glob(f"{name}/*.so")
        built.append(so.stat().st_mtime_ns)
    assert built[0] == built[1], "the op was rebuilt when only PATH changed"


def test_the_local_launcher_stops_the_ranks_left_waiting_on_a_dead_one(capfd):
    """`adm train --nproc N`: a rank that dies (here: exits 3 at once) would leave the others blocked in a
    collective until the process group's timeout; they are stopped after a grace period instead."""
    import subprocess
    import sys
    import time

    from trainer.cli import wait_all

    procs = [subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"]),
             subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])]
    start = time.monotonic()
    codes = wait_all(procs, grace_s=1.0)
    assert codes == [3, -9] and time.monotonic() - start < 60
    assert "rank 0 exited with code 3; stopping rank(s) [1]" in capfd.readouterr().err
    # ranks that all end (well or preempted) are simply waited for
    procs = [subprocess.Popen([sys.executable, "-c", f"import sys, time; time.sleep(1.5); sys.exit({c})"]) for c in (0, 75)]
    assert wait_all(procs, grace_s=0.1) == [0, 75]


def test_one_training_per_run_directory(digit_shards, tmp_path):
    """A second training into a run directory another process trains in is refused, naming the holder, by
    the launcher of `--nproc 2` and by a single-process run; the lock ends with its process (here killed)."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import REPO, run_cli

    from trainer.runlock import RunDirBusy, acquire
    from trainer.runlock import holder as held_by

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from trainer.runlock import acquire; acquire(Path(sys.argv[1])); print('held', "
                               "flush=True); time.sleep(600)", str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"in use by another training \\(pid {holder.pid} on "
                                             f"{re.escape(socket.gethostname())}, since "):
            acquire(run)
        base = ["preset=tiny-32", "model.num_classes=11", f"data={digit_shards / 'train'}", f"run_dir={run}",
                "num_slots=2", "data_workers=1", "total_kimg=0.064"]
        for nproc in ("2", "1"):
            proc = run_cli("train", *base, "--nproc", nproc, check=False)
            assert proc.returncode != 0 and f"is in use by another training (pid {holder.pid}" in proc.stderr, \
                proc.stderr[-2000:]
            assert "[train]" not in proc.stdout and not (run / "checkpoints" / "LATEST").exists()
        assert held_by(run)["pid"] == holder.pid  # a look that takes nothing: `adm submit train` refuses too
        proc = run_cli("submit", "train", *base, "--cluster", "local", "--cpu", "--dry-run", check=False)
        assert proc.returncode == 2 and f"is in use by another training, pid {holder.pid} on" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    assert held_by(run) is None
    assert acquire(run) and json.loads((run / "train.lock").read_text())["pid"] == os.getpid()


def test_the_device_a_rank_file_was_saved_on():
    """A resume on another kind of device re-seeds: its generator states do not fit (older files say nothing)."""
    cpu_state = torch.Generator().get_state()
    assert ckpt.saved_device({"gen": cpu_state}) == "cpu" and ckpt.saved_device({"gen": cpu_state, "device": "cuda"}) == "cuda"
    assert ckpt.saved_device({"gen": torch.zeros(16, dtype=torch.uint8)}) == "cuda"  # a CUDA generator's state


def test_status_sums_data_skips_and_parameter_norm_over_ranks(monkeypatch):
    """Means are over every rank's samples; skipped data samples and |params|^2 are summed over ranks."""
    from trainer import distributed
    from trainer.loop import _Stats

    ranks = [_Stats(1000), _Stats(1000)]
    for st, (loss, skipped, sq) in zip(ranks, [([1.0, 3.0], 2, 9.0), ([5.0], 3, 16.0)]):
        st.add_classifier(torch.tensor([0] * len(loss)), torch.tensor(loss), torch.eye(11)[:len(loss)],
                          torch.arange(len(loss)))
        st.data_skipped, st.param_sq = skipped, torch.tensor(sq)
    states = []
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: states.append(obj) or states)
    ranks[1].means()  # what rank 1 contributes
    means = ranks[0].means()
    assert means["loss"] == pytest.approx(3.0) and means["loss_q0"] == pytest.approx(3.0)
    assert means["acc1"] == pytest.approx(1.0) and means["data_skipped"] == 5 and means["param_norm"] == 5.0


def test_slots_holding_unequal_shard_counts_are_warned_of_with_the_shard_size_that_evens_them(capsys):
    """Slots take turns a shard at a time: 768 slots over 1,282 shards leave 254 slots with one shard an
    epoch, whose shards come round twice while the others' come once. Counted here by running the loader's
    own order (data_pipeline.order) for two turns of every slot; the shard size the warning names evens it."""
    from collections import Counter
    from types import SimpleNamespace

    from data_pipeline.order import Order, Position
    from trainer.cli import warn_uneven_slots

    def read_twice(shards: int, slots: int = 768) -> int:
        order, reads = Order([1000] * shards, slots, seed=0), Counter()
        for slot in range(slots):
            pos = Position()
            for _ in range(2):  # two turns: a shard each
                reads[order.shards_of(slot, pos.epoch)[pos.shard]] += 1
                pos = order.advance(slot, Position(pos.epoch, pos.shard, 999))  # past the shard's last sample
        return sum(n == 2 for n in reads.values())

    cfg = SimpleNamespace(num_slots=768, data="in64")
    warn_uneven_slots(cfg, {"shards": [{}] * 1282, "num_samples": 1281167})
    err = capsys.readouterr().err
    assert read_twice(1282) >= 254 * 0.9  # the 254 one-shard slots' second shards (a few repeat one in one)
    assert ("warning: num_slots: in64's 1282 shards over 768 slots: 254 slots hold 1 shard(s) an epoch and 514 hold "
            "2, so 20% of the images come round 2x as often") in err and "--shard-size 835" in err
    size = int(err.split("--shard-size ")[1].split()[0])
    shards = -(-1281167 // size)
    assert shards == 1535 and read_twice(shards) <= 2  # two per slot but one: even
    for slots, shards in ((768, shards), (64, 1282), (4, 26)):  # even enough: nothing said
        warn_uneven_slots(SimpleNamespace(num_slots=slots, data="d"), {"shards": [{}] * shards, "num_samples": 1})
    assert capsys.readouterr().err == ""


def test_shards_not_as_written_are_said_at_the_start(digit_shards, tmp_path, capsys, monkeypatch):
    """A shard cut short by a copy, or missing, would lose its samples every epoch, one warning per read deep in
    the log: the trainer's start says which, against the manifest's sizes; intact data, nothing."""
    import shutil

    from data_pipeline.verify import read_manifest
    from trainer.cli import check_data

    monkeypatch.delenv("ADM_LOCAL_CHILD", raising=False)
    data = tmp_path / "train"
    shutil.copytree(digit_shards / "train", data)
    cfg = load_train_config(None, ["preset=tiny-32", "model.num_classes=11", f"data={data}", "num_slots=2"])
    check_data(cfg, 1)
    assert "warning" not in capsys.readouterr().err
    shards = read_manifest(data)["shards"]
    cut, gone = shards[3], shards[7]
    with open(data / cut["name"], "r+b") as f:
        f.truncate(cut["bytes"] // 2)
    (data / gone["name"]).unlink()
    check_data(cfg, 1)
    err = capsys.readouterr().err
    assert (f"warning: data: 2 of {len(shards)} shards in {data} are not as written: {cut['name']} "
            f"({cut['bytes'] // 2} bytes, the manifest says {cut['bytes']}), {gone['name']} (no such file or "
            f"directory); their unreadable samples will be skipped") in err and f"adm data verify {data}" in err


def test_settings_and_held_out_data_are_checked_before_start(digit_shards, tmp_path, capsys):
    """Values that used to fail after the ranks started (or after training time was spent, or never),
    refused up front naming the field; held-out data must match the training data's classes."""
    import re
    import shutil

    from trainer.cli import check_data, check_precision

    base = ["preset=tiny-classifier-32", "model.num_classes=11", f"data={digit_shards / 'train'}", "num_slots=8",
            "data_workers=1"]
    for override, expected in [
        ("total_kimg=1e-9", "total_kimg: 1e-09 kimg is less than one global batch of 32 images"),
        ("lr=-1e-3", "lr: must be positive, got -0.001"),
        ("betas=[0.9]", "betas: AdamW takes two betas, each in [0, 1), got [0.9]"),
        ("grad_clip=-1", "grad_clip: must be 0 or more"),
        ("warmup_kimg=-1", "warmup_kimg: must be 0 or more"),
        ("checkpoint_kimg=-1", "checkpoint_kimg: must be positive"),
        ("grid_size=0", "grid_size: must be at least 1"),
        ("val_batches=0", "val_batches: must be at least 1"),
        ("diffusion.steps=0", "diffusion.steps: need at least 1 step"),
        ("diffusion.schedule_sampler=loss-second-momnt", "diffusion.schedule_sampler: 'loss-second-momnt' is not one"),
        ("ema_rates=[0.99,0.99]", "ema_rates: each value once, got [0.99, 0.99]"),
        ("power_ema=[0.05,0.1,0.05]", "power_ema: each value once, got [0.05, 0.1, 0.05]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(expected)):
            load_train_config(None, base + [override])
    with pytest.raises(ValueError, match="model.small_size: 24 does not divide image_size 64"):
        load_train_config(None, ["preset=tiny-upsampler-32-64", "model.small_size=24"])
    with pytest.raises(ValueError, match="patch_size: only the upsampler trains on patches .task classifier.; set it to 0"):
        load_train_config(None, base + ["patch_size=16"])
    for patch in (20, 64, -8):  # 64 -> 32 with 4 levels: a multiple of 2 and of 8, under 64
        with pytest.raises(ValueError, match=f"patch_size: {patch}: 0 .whole images. or less than model.image_size 64 "
                                             "and a multiple of both the upsampling factor 2 and the UNet's 8"):
            load_train_config(None, ["preset=tiny-upsampler-32-64", f"patch_size={patch}"])
    assert load_train_config(None, ["preset=tiny-upsampler-32-64", "patch_size=24"]).patch_size == 24
    with pytest.raises(ValueError, match="precision: fp16 .* needs a GPU"):
        check_precision("fp16")
    val = digit_shards / "val"  # 30 held-out digits in 4 shards
    capsys.readouterr()
    check_data(load_train_config(None, base + [f"val_data={val}"]), 4)
    # the classifier's random-resized crop from 32x32 center crops upscales (ADM's crops from the full image)
    assert (f"warning: data: {digit_shards / 'train'} holds images preprocessed with center-crop:32; the classifier's "
            "random-resized crop scales short sides to between 32 and 40, so it will upscale them") \
        in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"val_data: {val} has 4 shard\\(s\\) for 8 rank\\(s\\)"):
        check_data(load_train_config(None, base + [f"val_data={val}"]), 8)
    capsys.readouterr()
    check_data(load_train_config(None, ["preset=tiny-32", *base[1:], f"val_data={val}"]), 1)
    err = capsys.readouterr().err  # the diffusion model's center crop is ADM's own: nothing to say about it
    assert "warning: val_data: only the classifier task validates on held-out data; the diffusion task ignores it" \
        in err and "random-resized" not in err
    assert load_train_config(None, base + ["keep_last=0"]).keep_last == 0  # keep every checkpoint
    other = tmp_path / "other"
    shutil.copytree(val, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][1:]  # one class fewer: every index after it shifts
    manifest["num_classes"] -= 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"val_data: .* has another class table than data .* \(10 classes vs 11\)"):
        check_data(load_train_config(None, base + [f"val_data={other}"]), 1)


def test_ranks_wait_for_the_universal_conversion_on_disk(tmp_path):
    """While rank 0 converts a checkpoint for a resume at another world size, the other ranks wait on the shared
    disk (no collective to time out): they go on when the converted directory appears, stop with rank 0's
    message when its conversion failed, and an earlier attempt's failure is cleared before the next one."""
    import threading

    root = tmp_path / ckpt.CKPT
    one, two = make_ckpt(tmp_path, 1), make_ckpt(tmp_path, 2)

    def converted():  # as rank 0's conversion ends: the folder, naming the save it came from
        (root / f"universal-{one}" / "ds").mkdir(parents=True)
        (root / f"universal-{one}" / ckpt.SOURCE).write_text(ckpt._manifest_digest(tmp_path, one))

    threading.Timer(0.3, converted).start()
    assert ckpt.wait_universal(tmp_path, one, poll_s=0.05, limit_s=30) == root / f"universal-{one}"
    (root / f".failed-universal-{two}").write_text("converting img2 failed: disk full")
    with pytest.raises(RuntimeError, match="converting img2 failed: disk full"):
        ckpt.wait_universal(tmp_path, two, poll_s=0.05, limit_s=30)
    ckpt.clear_failed_conversions(tmp_path)
    with pytest.raises(RuntimeError, match="has not appeared after 0 s"):
        ckpt.wait_universal(tmp_path, two, poll_s=0.05, limit_s=0.2)


def test_a_conversion_of_an_older_save_of_the_same_count_is_never_used(tmp_path, monkeypatch):
    """A rollback (newer checkpoints moved aside) retrains to a count it saved before: its universal
    conversion, of the old weights, must not be loaded for the new save at another world size. Committing
    the tag again removes it, and a conversion naming another save is converted again, never waited on."""
    import subprocess

    root = tmp_path / ckpt.CKPT
    tag = make_ckpt(tmp_path, 256)
    calls = []

    def fake_convert(cmd, **kw):  # ds_to_universal: writes the output folder
        calls.append(cmd)
        out = Path(cmd[cmd.index("--output_folder") + 1])
        out.mkdir(parents=True)
        (out / "weights").write_text(f"from save {len(calls)}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_convert)
    first = ckpt.universal_dir(tmp_path, tag)
    assert ckpt.universal_dir(tmp_path, tag) == first and len(calls) == 1  # converted once, then reused
    assert ckpt.wait_universal(tmp_path, tag, limit_s=1) == first
    # the rollback: the same count committed again (same files and sizes), its conversion goes with the old save
    again = ckpt.tmp_dir(tmp_path, tag)
    again.mkdir()
    for f in ("a.pt", "b.pt"):
        (again / f).write_bytes(b"y" * 257)
    ckpt.commit(tmp_path, tag, 2)
    assert not first.exists()
    # and a conversion left from another save (by a version that did not remove it) is not taken either
    stale = root / f"universal-{tag}"
    (stale / "ds").mkdir(parents=True)
    (stale / ckpt.SOURCE).write_text("0" * 64)
    with pytest.raises(RuntimeError, match="has not appeared"):
        ckpt.wait_universal(tmp_path, tag, poll_s=0.05, limit_s=0.2)
    assert (ckpt.universal_dir(tmp_path, tag) / "ds" / "weights").read_text() == "from save 2"


def test_a_filesystem_without_flock_is_said_not_locked(tmp_path, monkeypatch, caplog):
    """Some cluster filesystems refuse flock: training goes on unlocked, and says so once (a second training in the
    same directory would not be refused there)."""
    import errno
    import fcntl
    import logging

    from trainer import runlock

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with caplog.at_level(logging.WARNING, logger="trainer.runlock"):
        assert runlock.acquire(tmp_path / "run") is False
    assert "refuses flock (No locks available): the run directory is not locked" in caplog.text


def test_auto_precision_on_a_gpu_that_only_emulates_bf16_is_fp16(monkeypatch):
    """A V100 or T4 'supports' bf16 only by emulation (torch's default answer counts it): ADM's fp16 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_who_requeues_is_decided_when_the_ranks_agree_not_by_a_later_sigterm():
    """SIGUSR2 (our --signal) stops the ranks: submitit requeues, even if srun's --kill-on-bad-exit sends a
    SIGTERM to the last ranks once the first have exited. A SIGTERM before the agreement is Slurm ending the
    job itself: no requeue from us."""
    import os
    import signal

    from trainer import preemption

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        for first, expected in ((signal.SIGUSR2, True), (signal.SIGTERM, False)):
            preemption.RECEIVED.clear()
            flag = preemption.PreemptionFlag()
            os.kill(os.getpid(), first)  # delivered to the main thread before os.kill returns
            assert flag.requested and flag.signal_name == first.name
            flag.agree()
            os.kill(os.getpid(), signal.SIGTERM)  # the late SIGTERM: recorded, but too late to matter
            assert "SIGTERM" in preemption.RECEIVED
            assert preemption.submitit_should_requeue() is expected
    finally:
        preemption.RECEIVED.clear()
        preemption.AGREED.clear()
        for s, h in before.items():
            signal.signal(s, h)


def test_a_signal_that_comes_as_the_handlers_change_hands_is_kept(monkeypatch):
    """A preemption signal that arrives while the launcher's or the training loop's handlers replace the early
    ones (catch_early's) is acted on: not recorded by the old handler after the new owner looked (a SIGTERM
    lost so, as `adm train --nproc 2` started its ranks, let them train to the end)."""
    import os
    import signal
    import subprocess
    import sys

    from trainer import preemption

    real = signal.signal
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    sent = []

    def signal_meanwhile(signum, handler):  # the SIGTERM lands in the middle of the handover
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return real(signum, handler)

    try:
        preemption.RECEIVED.clear()
        preemption.catch_early()
        monkeypatch.setattr(signal, "signal", signal_meanwhile)
        flag = preemption.PreemptionFlag()
        assert sent and flag.requested and flag.signal_name == "SIGTERM"
    finally:
        monkeypatch.undo()
        preemption.RECEIVED.clear()
        for s, h in before.items():
            signal.signal(s, h)
    # the launcher: the same SIGTERM is passed on to its rank
    code = """
import os, signal, subprocess, sys, trainer.cli as c
from trainer import preemption
preemption.catch_early()
real_signal, real_popen, sent = signal.signal, subprocess.Popen, []
def signal_meanwhile(signum, handler):
    if not sent:
        sent.append(os.kill(os.getpid(), signal.SIGTERM))
    return real_signal(signum, handler)
signal.signal = signal_meanwhile
rank = ("import time; from trainer import preemption; preemption.catch_early(); time.sleep(1); "
        "print(sorted(preemption.RECEIVED))")
c.subprocess.Popen = lambda cmd, env=None, **kw: real_popen([sys.executable, "-c", rank], **kw)
print(c.launch_local(1, []))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n")[:2] == ["['SIGTERM']", "0"], proc.stdout + proc.stderr


def test_each_rank_flushes_the_checkpoint_files_it_wrote(tmp_path, monkeypatch):
    """On Lustre or GPFS an fsync flushes only the calling node's pages: rank r must flush the files rank r
    wrote (DeepSpeed's zero_pp_rank_r_*, our rank0000r.pt); rank 0 the shared ones. Every file once."""
    import os

    written = {0: ["client.json", "rank00000.pt", "zero_to_fp32.py", "ds/mp_rank_00_model_states.pt", "ds/latest",
                   "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_0_mp_rank_00_model_states.pt"],
               1: ["rank00001.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                   "ds/zero_pp_rank_1_mp_rank_00_model_states.pt"],
               10: ["rank00010.pt", "ds/zero_pp_rank_10_mp_rank_00_optim_states.pt"]}
    for names in written.values():
        for name in names:
            (tmp_path / name).parent.mkdir(exist_ok=True)
            (tmp_path / name).write_bytes(b"x")
    flushed = []
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")))
    for rank in (0, 1, 10, 2):
        flushed.clear()
        ckpt.fsync_files(tmp_path, rank)
        assert sorted(flushed) == sorted(str(tmp_path / n) for n in written.get(rank, [])), rank


def test_a_requeued_job_goes_on_past_its_own_dead_runs_lock(tmp_path, monkeypatch, caplog):
    """A node that died can keep its flock on a shared filesystem: the requeued job (same SLURM_JOB_ID,
    another node) is not refused by its own earlier run, which Slurm ended; another job's lock still refuses."""
    import fcntl
    import logging
    import os

    from trainer.runlock import LOCK, RunDirBusy, acquire

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(json.dumps({"host": "node-that-died", "pid": 4242, "since": "earlier",
                                        "slurm_job_id": "55"}))
    fd = os.open(run / LOCK, os.O_RDWR)  # the stale lock, held by another open file description
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "56")
        with pytest.raises(RunDirBusy, match="pid 4242 on node-that-died"):
            acquire(run, wait_other_host_s=0.0)
        monkeypatch.setenv("SLURM_JOB_ID", "55")
        with caplog.at_level(logging.WARNING, logger="trainer.runlock"):
            assert acquire(run, wait_other_host_s=0.0) is False
        assert "an earlier run of this job (55)" in caplog.text
    finally:
        os.close(fd)
    monkeypatch.setenv("SLURM_JOB_ID", "57")
    assert acquire(run) and json.loads((run / LOCK).read_text())["slurm_job_id"] == "57"


@pytest.mark.parametrize("steps", [1, 8, 25, 30, 1000, 4000])
def test_grid_sampling_takes_up_to_25_steps_of_any_diffusion_length(steps):
    """The snapshot grid's DDIM steps: ddim25 for ADM's lengths, and a length no integer stride gives 25
    of (30) or shorter than 25 (8) still samples, instead of failing at the first snapshot."""
    from models.respace import space_timesteps
    from trainer.grid import grid_respacing

    kept = space_timesteps(steps, grid_respacing(steps))
    assert len(kept) == min(25, steps) and 0 in kept and max(kept) < steps
    if steps in (1000, 4000):
        assert grid_respacing(steps) == "ddim25"  # the integer stride, as before


def test_a_grid_cut_short_never_takes_a_grids_name(tmp_path, monkeypatch):
    """The report embeds RUN/grids/*.png as they are, rewritten every scheduled pass while the training runs:
    a grid whose write is cut short (a full disk here, a kill alike) leaves the earlier grid of that name
    whole, and no other .png beside it."""
    import errno

    import numpy as np
    from PIL import Image

    from trainer.grid import save_grid

    path = tmp_path / "grids" / "img000000000512.png"
    path.parent.mkdir()
    first = Image.fromarray(np.full((8, 8, 3), 7, np.uint8))
    save_grid(first, path)
    png = Image.SAVE["PNG"]

    def cut_short(im, fp, filename, *args, **kwargs):
        png(im, fp, filename, *args, **kwargs)
        fp.seek(fp.tell() // 2)
        fp.truncate()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(Image.SAVE, "PNG", cut_short)
    for name in (path.name, "img000000001024.png"):
        with pytest.raises(OSError):
            save_grid(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), path.with_name(name))
    monkeypatch.undo()
    assert [p.name for p in path.parent.glob("*.png")] == [path.name]
    assert (np.asarray(Image.open(path)) == 7).all()


def test_the_snapshot_grid_reads_an_x0_network_as_one():
    """diffusion.predict_xstart=true: the grid's sampler reads the network's output as x0 (a network that
    outputs 0 everywhere gives an exactly mid-grey grid), as the snapshot records for `adm sample`."""
    import numpy as np

    from models.config import build_model
    from trainer.grid import sample_grid

    for predict_xstart in (True, False):
        cfg = load_train_config(None, ["preset=tiny-32", "grid_size=2", "diffusion.steps=20",
                                       f"diffusion.predict_xstart={str(predict_xstart).lower()}"])
        assert cfg.diffusion.for_sampling() == {"steps": 20, "noise_schedule": cfg.diffusion.noise_schedule,
                                                "predict_xstart": predict_xstart}
        zeros = {k: torch.zeros_like(v) for k, v in build_model(cfg.model).state_dict().items()}
        grid = np.asarray(sample_grid(zeros, cfg, torch.device("cpu")))
        assert grid.shape[:2] == (64, 64) and (grid == 128).all() == predict_xstart  # (the grid rounds)


def test_snapshots_without_checkpoints_are_not_silently_written_over(tmp_path, capsys):
    """A run directory whose checkpoints are gone but whose snapshots remain: another training's (here a
    wider model) is refused before anything starts, naming the difference; the same training's starts
    again at image 0 and says it will write over them."""
    from dataclasses import asdict

    from trainer.cli import check_resume

    run = tmp_path / "run"
    old = load_train_config(None, ["preset=tiny-32", f"run_dir={run}", "model.dropout=0.1"])
    snap = run / "snapshots" / "img000000000128"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"images": 128, "training_options": asdict(old)}))
    posthoc = run / "snapshots" / "img000000000128-posthoc-0.070"  # not the training's own: not compared
    posthoc.mkdir()
    (posthoc / "config.json").write_text(json.dumps({"images": 128, "posthoc": {}, "training_options": {}}))
    wider = load_train_config(None, ["preset=tiny-32", f"run_dir={run}", "model.model_channels=64"])
    with pytest.raises(ValueError, match=re.escape(
            f"run_dir: {run} holds another training's snapshots (up to img000000000128: model.model_channels: "
            f"{old.model.model_channels!r} in the run, 64 now) and no checkpoint to resume: training here would "
            "write over them; use a new run_dir")):
        check_resume(wider)
    same = load_train_config(None, ["preset=tiny-32", f"run_dir={run}"])  # dropout may change
    check_resume(same)
    assert (f"run_dir: {run} has snapshots up to img000000000128 but no checkpoint: training starts again at "
            "image 0") in capsys.readouterr().err
    check_resume(load_train_config(None, ["preset=tiny-32", f"run_dir={tmp_path / 'new'}"]))  # nothing there
    assert capsys.readouterr().err == ""


def test_the_status_line_marks_a_quartile_no_sample_fell_in():
    """Four timestep quartiles always, "-" where an interval drew no timestep (3 values for 4 was unreadable)."""
    from trainer.loop import _quartiles

    assert _quartiles({"loss_q0": 0.5, "loss_q2": 0.125, "loss_q3": 1 / 3}, "loss") == "0.5/-/0.125/0.333"
    assert _quartiles({}, "acc1") == "-/-/-/-"


def test_the_up_front_warnings_are_said_by_one_process(monkeypatch, capsys):
    """Every process of a launch runs the same checks: their warnings come from the launcher of --nproc N,
    else from rank 0, not once per process (three times for --nproc 2)."""
    from trainer.cli import _say

    for var in ("ADM_LOCAL_CHILD", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                "SUBMITIT_LOCAL_GLOBALID"):
        monkeypatch.delenv(var, raising=False)
    _say("warning: said")
    for env in ({"ADM_LOCAL_CHILD": "1", "RANK": "0"}, {"RANK": "1"}, {"SLURM_PROCID": "3"}, {"PMI_RANK": "1"},
                {"SUBMITIT_LOCAL_GLOBALID": "1"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            _say(f"warning: not said {env}")
    monkeypatch.setenv("SLURM_PROCID", "0")
    _say("warning: rank 0 says it")
    assert capsys.readouterr().err == "warning: said\nwarning: rank 0 says it\n"


def test_a_non_finite_streak_from_the_first_step_after_a_resume_points_before_the_checkpoint(tmp_path):
    from trainer import checkpoint as ckpt
    from trainer.loop import _bad_streak_message

    for images in (16, 32, 48):
        d = tmp_path / ckpt.CKPT / ckpt.tag_for(images)
        d.mkdir(parents=True)
        (d / ckpt.MANIFEST).write_text(json.dumps({"files": {}}))
    resumed = (ckpt.tag_for(48), {})
    # resumed from img48 at 48 images; 3 bad steps of 16 since: the resumed checkpoint is suspect
    text = _bad_streak_message(tmp_path, 3, 96, 16, ckpt.tag_for(48), resumed)
    assert f"last good checkpoint is {tmp_path / 'checkpoints' / ckpt.tag_for(48)}, which this run resumed from" in text
    assert f"move it aside to resume from {tmp_path / 'checkpoints' / ckpt.tag_for(32)}" in text
    # finite steps after the resume, then the streak: the resumed checkpoint is simply the last good one
    text = _bad_streak_message(tmp_path, 2, 96, 16, ckpt.tag_for(48), resumed)
    assert "resumed from" not in text and text.endswith("then resume")


def test_a_checkpoint_whose_client_state_cannot_be_read_is_skipped_with_the_reason(tmp_path, caplog):
    from trainer import checkpoint as ckpt

    good = {"images": 16, "step": 1, "fixed_hash": "x", "loader": {}}
    for images, text in [(16, json.dumps(good)), (32, '{"images": 32, "st'), (48, json.dumps({"x": 1}))]:
        d = tmp_path / ckpt.CKPT / ckpt.tag_for(images)
        d.mkdir(parents=True)
        (d / "client.json").write_text(text)
        (d / ckpt.MANIFEST).write_text(json.dumps({"files": {"client.json": len(text)}}))
    skipped = []
    assert ckpt.find_latest(tmp_path, skipped)[0] == ckpt.tag_for(16)
    assert skipped[0].startswith(f"{ckpt.tag_for(48)}: client.json lacks images, step, fixed_hash, loader")
    assert skipped[1].startswith(f"{ckpt.tag_for(32)}: client.json unreadable (")
    (tmp_path / "training_options.json").write_text('{"task": "diff')  # cut short: said, then ignored
    with caplog.at_level("WARNING"):
        assert ckpt.read_options(tmp_path) == {}
    assert "training_options.json: unreadable (" in caplog.text


def test_a_mistake_is_blamed_on_the_file_or_the_command_line_it_came_from(tmp_path):
    """An override's unknown key or bad value names the command line, not the YAML file it was merged into;
    the file's own mistakes name the file, whatever the overrides."""
    from adm.config import ConfigError

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("preset: tiny-32\n")
    bad.write_text("preset: tiny-32\nbogus: 1\n")
    for path, overrides, message in [
            (good, ["model.foo=1"], "command line: unknown key 'model.foo'"),
            (good, ["lr=abc"], "command line: bad value for 'lr'"),
            (None, ["preset=tiny-32", "model.foo=1"], "command line: unknown key 'model.foo'"),
            (bad, ["lr=1"], f"{bad}: unknown key 'bogus'")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_train_config(str(path) if path else None, overrides)
    assert load_train_config(str(good), ["lr=1"]).lr == 1.0


@pytest.mark.parametrize("bf16", [False, True])
def test_each_rank_flushes_the_optimizer_shard_deepspeed_names_for_it(bf16):
    """On a parallel filesystem an fsync reaches only the calling node's pages, so each rank flushes the files
    it wrote: the optimizer shard DeepSpeed names for data-parallel rank r (with a bf16_ prefix under bf16 at
    ZeRO 1/2, which was taken for rank 0's) belongs to rank r. Names from DeepSpeed's own functions."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine

    from trainer.checkpoint import writer_rank

    engine = SimpleNamespace(_get_zero_ckpt_prefix=lambda r, bf16_mode: DeepSpeedEngine._get_zero_ckpt_prefix(
        None, r, bf16_mode))
    for r in (0, 1, 7, 123):
        optim = DeepSpeedEngine._get_rank_zero_ckpt_name(engine, "ckpt", "ds", 0, r, bf16)
        assert writer_rank(os.path.basename(optim)) == r, optim
        assert writer_rank(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") == r  # ZeRO-3's model states
        assert writer_rank(f"rank{r:05d}.pt") == r
    assert writer_rank("mp_rank_00_model_states.pt") == 0 and writer_rank("client.json") == 0


def test_every_seed_the_config_accepts_seeds_the_generators():
    """seed may be anything in [0, 2^63): the derived generator seeds (seed x 1,000,003 + rank + 7919 x images)
    passed torch's 64 bits from about 1.8e13 on and stopped the training after DeepSpeed had started.
    Below that they are unchanged, so runs keep their trajectories."""
    from trainer.loop import _seed

    for seed in (0, 12345, 2**44, 2**63 - 1):
        for rank, images in ((0, 0), (1023, 10**12)):
            derived = seed * 1_000_003 + rank + 7919 * images
            torch.Generator().manual_seed(_seed(derived))  # accepted
            assert _seed(derived) == derived or derived >= 2**64
            # past 2^64 folded, not clamped: the low 64 bits kept, so what differs there still differs
            assert 0 <= _seed(derived) < 2**64 and (derived - _seed(derived)) % 2**64 == 0
        # each rank its own generator at the largest seed too (one value for all would give every rank the
        # same timesteps and noise)
        seeds = {_seed(seed * 1_000_003 + rank + 7919 * 10**12) for rank in range(8)}
        assert len(seeds) == 8
    load_train_config(None, ["preset=tiny-32", f"seed={2**63 - 1}"])


def test_the_first_step_is_timed_from_the_launcher_for_ranks_it_started(monkeypatch):
    """`[timing] first step done N s after process start` (the resume-to-first-step benchmark) counts from
    `adm train --nproc N`'s own start, whose config and data checks come before its ranks exist; a rank
    started any other way (torchrun, srun, one process) counts from its own start."""
    import subprocess
    import sys

    import psutil

    from trainer.loop import process_start

    own = psutil.Process().create_time()
    monkeypatch.delenv("ADM_LOCAL_CHILD", raising=False)
    monkeypatch.setenv("ADM_LAUNCHER_START", str(own - 100))  # left over in the environment: not ours
    assert process_start() == own
    monkeypatch.setenv("ADM_LOCAL_CHILD", "1")
    assert process_start() == own - 100
    # what the launcher hands its ranks: its own start, on the clock psutil reads
    code = """
import subprocess, psutil, trainer.cli as c, trainer.distributed  # (torch imported before Popen is replaced)
real = subprocess.Popen
def fake(cmd, env=None, **kw):
    print(env["ADM_LAUNCHER_START"], repr(psutil.Process().create_time()))
    return real(["true"])
c.subprocess.Popen = fake
c.launch_local(1, [])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    handed, launcher = proc.stdout.split()
    assert float(handed) == float(launcher) > own, proc.stderr


def test_the_launcher_sees_a_later_rank_fail_while_an_earlier_one_waits_on_it():
    """Rank 1 dies (a signal, a crash) while rank 0 waits for it in a collective: the launcher must notice
    (every rank polled, not only up to the first still running), stop rank 0 after the grace, and return."""
    import subprocess
    import sys
    import time

    from trainer.cli import wait_all

    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dying = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    start = time.monotonic()
    codes = wait_all([waiting, dying], grace_s=1.0)
    assert codes == [-9, 3] and time.monotonic() - start < 30


def test_a_rank_started_by_the_launcher_keeps_a_signal_sent_while_it_starts():
    """The launcher's ranks start with the preemption signals blocked: one forwarded before the rank's first
    line is delivered to the handler that line installs (recorded, for the first step boundary), not lost and
    not fatal."""
    import subprocess
    import sys

    from data_pipeline.parent_death import stop_with_parent
    from trainer.cli import _rank_setup

    code = ("import os, signal, time; time.sleep(0.5); from trainer import preemption; preemption.catch_early(); "
            "time.sleep(0.2); print(sorted(preemption.RECEIVED))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            preexec_fn=_rank_setup(stop_with_parent(os.getpid())))
    proc.send_signal(signal.SIGTERM)  # while it sleeps, before its handler exists
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "['SIGTERM']"


def test_a_run_dir_that_cannot_be_created_is_refused_before_training(digit_shards, tmp_path):
    """Its parent a file: said naming run_dir before any rank or DeepSpeed starts (it came from the first
    rank's mkdir of checkpoints/, in OS words)."""
    (tmp_path / "afile").write_text("")
    run = tmp_path / "afile" / "sub"
    proc = run_cli("train", "preset=tiny-32", "model.num_classes=11", f"data={digit_shards / 'train'}",
                   f"run_dir={run}", "num_slots=2", "data_workers=1", "--nproc", "1", check=False)
    assert proc.returncode == 2 and f"run_dir: {run} cannot be created ({tmp_path / 'afile'} is not a directory)" \
        in proc.stderr, proc.stderr[-2000:]
    assert "deepspeed" not in proc.stderr.lower()


def test_kernel_choices_for_fp32_and_deterministic_training(monkeypatch):
    """On a GPU, precision=fp32 is true float32 (PyTorch's default runs cuDNN convolutions in TF32) and
    deterministic=true asks for deterministic kernels (cuDNN's benchmark off, cuBLAS's workspace condition);
    otherwise cuDNN benchmarks its convolutions and the TF32 defaults stay."""
    from trainer.loop import set_kernels

    flags = ("benchmark", "deterministic", "allow_tf32")
    saved = ({f: getattr(torch.backends.cudnn, f) for f in flags}, torch.backends.cuda.matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda = torch.device("cuda")  # (a device object only: nothing runs on it)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        set_kernels(cuda, "bf16", False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        set_kernels(cuda, "fp32", True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        torch.backends.cudnn.benchmark = True
        set_kernels(torch.device("cpu"), "fp32", False)  # a CPU: cuDNN's settings are not touched
        assert torch.backends.cudnn.benchmark
    finally:
        for f, v in saved[0].items():
            setattr(torch.backends.cudnn, f, v)
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_deepspeed_config_is_read_by_deepspeed_with_bounded_buckets_on_gpus():
    """The config our trainer hands DeepSpeed, parsed by DeepSpeed's own config classes: on GPUs ZeRO-1/2
    overlap the reduction with the backward pass in 2e8-element buckets (DeepSpeed's 5e8 default, doubled by the
    overlap, would hold 4 GB in fp32 under ZeRO-1); on a CPU, and at stage 3, DeepSpeed's defaults."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from trainer.config import load_train_config
    from trainer.loop import deepspeed_config

    for stage, cuda in ((1, True), (2, True), (3, True), (2, False)):
        cfg = load_train_config(None, ["preset=tiny-32", "batch=8", "precision=bf16", f"zero_stage={stage}"])
        parsed = DeepSpeedConfig(deepspeed_config(cfg, 4, 2, cuda=cuda))  # (one process: no group here)
        zero = parsed.zero_config
        assert parsed.zero_optimization_stage == stage and parsed.bfloat16_config.enabled
        assert parsed.train_batch_size == 8 and parsed.gradient_accumulation_steps == 2
        bounded = cuda and stage < 3
        assert zero.overlap_comm == (True if bounded else stage == 3)
        assert zero.reduce_bucket_size == (2e8 if bounded else 5e8), (stage, cuda)
        assert zero.allgather_bucket_size == (2e8 if bounded else 5e8), (stage, cuda)


def test_collectives_wait_as_long_as_the_config_says(tmp_path):
    """The process group's timeout is collective_timeout_min (DeepSpeed's own default, 10 minutes, is less
    than rank 0's snapshot write of a large model on a slow filesystem may take); it must be positive."""
    import subprocess
    import sys

    code = ("import torch, torch.distributed as dist; from trainer.distributed import DistEnv, _free_port, init; "
            "init(DistEnv(0, 1, 0, '127.0.0.1', _free_port(), 'single'), 37.0); "
            "print('timeout', dist.group.WORLD._get_backend(torch.device('cpu')).options._timeout)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "DEEPSPEED_TIMEOUT")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, timeout=300, env=env)
    assert "timeout 0:37:00" in proc.stdout, proc.stderr[-2000:]
    with pytest.raises(ValueError, match="collective_timeout_min: must be positive, got 0"):
        load_train_config(None, ["preset=tiny-32", "collective_timeout_min=0"])


def test_a_commit_lists_every_ranks_files_even_where_rank_0_sees_them_late(tmp_path):
    """Rank 0's view of a shared filesystem can lag behind another node's writes: the manifest lists what
    every rank flushed (fsync_files' answers), waiting until rank 0 sees each file whole; one that never
    shows up stops the commit with a clear error, the checkpoint before it still LATEST."""
    import threading

    make_ckpt(tmp_path, 100, files=("rank00000.pt",), world=1)
    tag = ckpt.tag_for(200)
    tmp = ckpt.tmp_dir(tmp_path, tag)
    tmp.mkdir(parents=True)
    (tmp / "rank00000.pt").write_bytes(b"a" * 10)
    (tmp / "ds").mkdir()
    (tmp / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"b" * 3)  # still growing, as seen
    written = {"rank00000.pt": 10, "rank00001.pt": 7, "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": 5}

    def arrive():  # the other node's files, as rank 0 comes to see them
        (tmp / "rank00001.pt").write_bytes(b"c" * 7)
        (tmp / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"b" * 5)

    timer = threading.Timer(1.0, arrive)
    timer.start()
    final = ckpt.commit(tmp_path, tag, 2, written, wait_s=30)
    timer.join()
    manifest = json.loads((final / ckpt.MANIFEST).read_text())
    assert manifest["files"] == {"ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": 5, "rank00000.pt": 10,
                                 "rank00001.pt": 7}
    assert ckpt.problem(tmp_path, tag) is None and (tmp_path / "checkpoints" / "LATEST").read_text() == tag + "\n"
    tag = ckpt.tag_for(300)
    tmp = ckpt.tmp_dir(tmp_path, tag)
    tmp.mkdir()
    (tmp / "rank00000.pt").write_bytes(b"a")
    with pytest.raises(RuntimeError, match=r"rank00001.pt was written \(7 bytes\) and flushed by its rank, but rank 0 "
                                           r"sees no such file after 1 s"):
        ckpt.commit(tmp_path, tag, 2, {"rank00000.pt": 1, "rank00001.pt": 7}, wait_s=1)
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == ckpt.tag_for(200) + "\n"
    assert not (tmp_path / "checkpoints" / tag).exists()
