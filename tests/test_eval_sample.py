"""`adm sample`: ADM-format npz shards, per-seed determinism, resumability, guidance and cascades."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from conftest import randomize_, run_cli
from models.config import build_model
from models.presets import get_preset
from models.sampling import draw_labels
from models.snapshot import save_snapshot


def snapshot(tmp_path, name, preset, seed):
    cfg = get_preset(preset).config()
    model = randomize_(build_model(cfg), seed=seed, scale=0.05)
    return save_snapshot(tmp_path / name, model.state_dict(), cfg,
                         meta={"diffusion": get_preset(preset).diffusion})


def test_sample_shards_are_per_seed_and_resumable(tmp_path):
    snap = snapshot(tmp_path, "base", "tiny-32", 1)
    common = ["sample", str(snap), "--num", "6", "--seed-start", "100", "--steps", "ddim4"]
    run_cli(*common, "--out", str(tmp_path / "a"), "--batch-size", "4", "--shard-size", "4", "--merge")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["samples-00000100-00000103.npz", "samples-00000104-00000105.npz", "samples.npz", "sampling.json"]
    merged = np.load(tmp_path / "a" / "samples.npz")
    assert merged["arr_0"].shape == (6, 32, 32, 3) and merged["arr_0"].dtype == np.uint8
    assert merged["arr_1"].tolist() == draw_labels(range(100, 106), 10).tolist()
    run_cli(*common, "--out", str(tmp_path / "b"), "--batch-size", "1", "--shard-size", "6", "--merge")
    other = np.load(tmp_path / "b" / "samples.npz")
    assert np.abs(other["arr_0"].astype(int) - merged["arr_0"]).max() <= 1  # same images (+-1 rounding)
    first = tmp_path / "a" / "samples-00000100-00000103.npz"
    before = first.stat().st_mtime_ns
    out = run_cli(*common, "--out", str(tmp_path / "a"), "--batch-size", "4", "--shard-size", "4").stdout
    assert first.stat().st_mtime_ns == before and "6 samples" in out  # finished shards are skipped
    (tmp_path / "afile").write_text("")
    for extra, expected in [  # refused before sampling: nothing in "a" changes
        (["--out", str(tmp_path / "a"), "--precision", "bf16"],  # another setting: the old shards are not its samples
         f"--out {tmp_path / 'a'} holds samples of another snapshot or setting (precision: 'fp32' there, 'bf16' now)"),
        (["--out", str(tmp_path / "afile")], f"--out {tmp_path / 'afile'}: a file"),
        (["--out", str(tmp_path / "a"), "--shard-size", "3"],  # another split: features would count seeds twice
         "samples-00000100-00000102.npz (there or planned) and samples-00000100-00000103.npz share seeds"),
        (["--out", str(tmp_path / "a"), "--shard-size", "4", "--num", "8"],  # the same split, extended
         "samples-00000104-00000105.npz is the short last shard of a smaller --num there; delete it"),
        (["--out", str(tmp_path / "a"), "--shard-size", "4", "--num", "5"],  # the same split, cut short
         "samples-00000104-00000105.npz there goes past this --num's last shard samples-00000104-00000104.npz"),
        (["--out", str(tmp_path / "e"), "--scale", "3"], "--scale is the classifier-guidance scale: give the classifier"),
    ]:
        proc = run_cli(*common, *extra, check=False)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_cli("sample", str(snap), "--num", "2", "--seed-start", "-1", "--out", str(tmp_path / "e"), check=False)
    assert proc.returncode == 2 and "--seed-start must be 0 or more" in proc.stderr
    assert first.stat().st_mtime_ns == before and not (tmp_path / "e").exists()
    from eval.features import sample_shards

    for name in ("samples-00000000-00000003.npz", "samples-00000004-00000005.npz", "samples-00000004-00000004.npz"):
        (tmp_path / "mixed" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "mixed" / name).write_bytes(b"")
    with pytest.raises(ValueError, match="samples-00000004-00000004.npz and samples-00000004-00000005.npz share seeds"):
        sample_shards(tmp_path / "mixed")
    (tmp_path / "mixed" / "samples-00000004-00000004.npz").unlink()
    assert [p.name for p in sample_shards(tmp_path / "mixed")] == ["samples-00000000-00000003.npz",
                                                                   "samples-00000004-00000005.npz"]


def test_guided_and_cascaded_sampling(tmp_path):
    base = snapshot(tmp_path, "base", "tiny-32", 1)
    clf = snapshot(tmp_path, "clf", "tiny-classifier-32", 2)
    up = snapshot(tmp_path, "up", "tiny-upsampler-32-64", 3)
    run_cli("sample", str(base), "--num", "2", "--steps", "ddim3", "--classifier", str(clf), "--scale", "2",
            "--upsampler", str(up), "--upsampler-steps", "3", "--out", str(tmp_path / "c"), "--merge")
    arr = np.load(tmp_path / "c" / "samples.npz")["arr_0"]
    assert arr.shape == (2, 64, 64, 3)
    from eval.sample import Sampler
    from eval.settings import EvalSetting

    for steps, loop in (("ddim2", "ddim_sample_loop"), ("2", "p_sample_loop")):  # the upsampler's sampler follows its steps
        sampler = Sampler(str(base), EvalSetting(name="c", steps="ddim2", upsampler=str(up), upsampler_steps=steps), "cpu")
        calls = []
        real = getattr(sampler.up_diffusion, loop)
        setattr(sampler.up_diffusion, loop, lambda *a, **k: calls.append(1) or real(*a, **k))
        assert sampler.batch([0])[0].shape == (1, 64, 64, 3) and calls == [1], steps
    bad = run_cli("sample", str(clf), "--num", "1", "--out", str(tmp_path / "d"), check=False)
    assert bad.returncode == 2 and "classifier snapshot" in bad.stderr
    bad = run_cli("sample", str(base), "--num", "1", "--upsampler", str(base), "--out", str(tmp_path / "d"), check=False)
    assert bad.returncode == 2 and f"{base}: a unet snapshot, expected an upsampler" in bad.stderr
    # a base of 11 classes with the 10-class classifier and upsampler: refused before the first seed, not
    # at the first seed whose label is 10
    cfg = dataclasses.replace(get_preset("tiny-32").config(), num_classes=11)
    base11 = save_snapshot(tmp_path / "base11", build_model(cfg).state_dict(), cfg,
                           meta={"diffusion": get_preset("tiny-32").diffusion})
    for extra, role in ((["--classifier", str(clf), "--scale", "2"], "classifier"), (["--upsampler", str(up)], "upsampler")):
        bad = run_cli("sample", str(base11), "--num", "1", *extra, "--out", str(tmp_path / f"e{role}"), check=False)
        assert bad.returncode == 2 and f"the {role} has 10 classes, {base11} samples 11" in bad.stderr, bad.stderr
    from eval.preflight import check
    from eval.settings import EvalSetting

    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(ValueError, match="the classifier has 10 classes"):
        check(base11, [EvalSetting(name="g", num=8, scale=1.0, classifier=str(clf))], ref)


def test_unconditional_model_guided_by_a_classifier(tmp_path):
    """ADM's unconditional 256 model + classifier: the labels go to the classifier only (guided-diffusion's
    model_fn drops y), checked against the diffusion loop run here that way; unguided unconditional samples
    carry no labels (no arr_1, as ADM's image_sample.py writes them)."""
    from models.adm_compat import create_gaussian_diffusion
    from models.guidance import classifier_cond_fn
    from models.noise import PerSampleNoise
    from models.snapshot import load_snapshot

    preset = get_preset("tiny-32")
    cfg = dataclasses.replace(preset.config(), num_classes=None)
    uncond = save_snapshot(tmp_path / "uncond", randomize_(build_model(cfg), seed=4, scale=0.05).state_dict(), cfg,
                           meta={"diffusion": preset.diffusion})
    clf_cfg = get_preset("tiny-classifier-32").config()  # weights large enough for gradients that show
    clf = save_snapshot(tmp_path / "clf", randomize_(build_model(clf_cfg), seed=2, scale=0.5).state_dict(), clf_cfg,
                        meta={"diffusion": preset.diffusion})
    run_cli("sample", str(uncond), "--num", "2", "--steps", "ddim3", "--out", str(tmp_path / "a"), "--merge")
    plain = np.load(tmp_path / "a" / "samples.npz")
    assert plain.files == ["arr_0"] and np.load(tmp_path / "a" / "samples-00000000-00000001.npz").files == ["arr_0"]
    run_cli("sample", str(uncond), "--num", "2", "--steps", "ddim3", "--classifier", str(clf), "--scale", "30",
            "--out", str(tmp_path / "b"), "--merge")
    guided = np.load(tmp_path / "b" / "samples.npz")
    labels = draw_labels(range(2), 10)
    assert guided["arr_1"].tolist() == labels.tolist()
    model, classifier = load_snapshot(uncond).build(), load_snapshot(clf).build()
    diffusion = create_gaussian_diffusion(steps=preset.diffusion["steps"], noise_schedule=preset.diffusion["noise_schedule"],
                                          learn_sigma=True, timestep_respacing="ddim3")
    noise = PerSampleNoise([0, 1])
    x = diffusion.ddim_sample_loop(lambda x, t, y=None: model(x, t), (2, 3, 32, 32), noise=noise.randn((2, 3, 32, 32)),
                                   cond_fn=classifier_cond_fn(classifier, 30.0), model_kwargs={"y": labels},
                                   generator=noise)
    expected = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(guided["arr_0"].astype(int) - expected).max() <= 1
    assert np.abs(guided["arr_0"].astype(int) - plain["arr_0"]).max() > 8  # the guidance acted


def test_a_stack_of_mismatched_sizes_is_refused_before_sampling(tmp_path):
    base = snapshot(tmp_path, "base", "tiny-32", 1)
    for name, preset, change, expected in [
        ("clf64", "tiny-classifier-32", {"image_size": 64}, "the classifier reads 64x64 images, {base} samples 32x32"),
        ("up16", "tiny-upsampler-32-64", {"small_size": 16}, "the upsampler takes 16x16 inputs, {base} samples 32x32"),
    ]:
        cfg = dataclasses.replace(get_preset(preset).config(), **change)
        other = save_snapshot(tmp_path / name, build_model(cfg).state_dict(), cfg,
                              meta={"diffusion": get_preset(preset).diffusion})
        flag = "--classifier" if name.startswith("clf") else "--upsampler"
        bad = run_cli("sample", str(base), "--num", "1", "--steps", "ddim2", flag, str(other),
                      "--out", str(tmp_path / "o"), check=False)
        assert bad.returncode == 2 and expected.format(base=base) in bad.stderr, bad.stderr
        assert not (tmp_path / "o").exists()
    # a classifier trained on another diffusion: its timestep t means another noise level
    for name, diffusion, trained_on in [("clf-lin", {"steps": 1000, "noise_schedule": "linear"}, "1000-step linear"),
                                        ("clf-4000", {"steps": 4000, "noise_schedule": "cosine"}, "4000-step cosine")]:
        cfg = get_preset("tiny-classifier-32").config()
        other = save_snapshot(tmp_path / name, build_model(cfg).state_dict(), cfg, meta={"diffusion": diffusion})
        expected = (f"{other}: the classifier was trained on a {trained_on} diffusion, {base} on a 1000-step cosine "
                    "one: its timesteps would mean other noise levels")
        bad = run_cli("sample", str(base), "--num", "1", "--steps", "ddim2", "--classifier", str(other),
                      "--out", str(tmp_path / "o"), check=False)
        assert bad.returncode == 2 and expected in bad.stderr, bad.stderr
        assert not (tmp_path / "o").exists()
        from eval.preflight import check
        from eval.settings import EvalSetting

        ref = tmp_path / "ref.npz"
        np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
        with pytest.raises(ValueError, match=re.escape(expected)):  # the farm's check before any job
            check(base, [EvalSetting(name="g", steps="ddim2", num=4, classifier=str(other), scale=1.0)], ref)
    bad = run_cli("sample", str(base), "--num", "1", "--classifier", str(tmp_path / "clf64"), "--scale", "nan",
                  "--out", str(tmp_path / "o"), check=False)
    assert bad.returncode == 2 and "scale must be a finite number, got nan" in bad.stderr
    # weights damaged in place (same size): refused, not sampled into plausible images
    import shutil

    shutil.copytree(base, tmp_path / "flipped")
    weights = tmp_path / "flipped" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0x40
    weights.write_bytes(bytes(data))
    bad = run_cli("sample", str(tmp_path / "flipped"), "--num", "1", "--steps", "ddim2", "--out", str(tmp_path / "f"),
                  check=False)
    assert bad.returncode == 2 and f"{weights}: sha256 differs from the manifest (corrupt)" in bad.stderr, bad.stderr
    # a claim whose sampling failed before its first shard does not block the directory
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "sampling.json").write_text('{"steps": "ddim9"}')
    run_cli("sample", str(base), "--num", "1", "--steps", "ddim2", "--out", str(tmp_path / "o"))
    assert json.loads((tmp_path / "o" / "sampling.json").read_text())["steps"] == "ddim2"


def test_bf16_sampling_is_per_seed_close_to_fp32_and_keyed_apart(tmp_path):
    """precision=bf16 runs the networks under bf16 autocast: still a function of the seed alone (a batch of
    one gives the batch of three's images), close to the fp32 images but not them, and an evaluation key
    of its own. fp32 keeps the key it had before the field existed (computed here the old way)."""
    import hashlib
    import json
    from dataclasses import asdict

    from eval.sample import Sampler
    from eval.settings import EVALUATOR_VERSION, EvalSetting, _digest, eval_key

    snap = snapshot(tmp_path, "base", "tiny-32", 1)
    images = {}
    for precision in ("fp32", "bf16"):
        sampler = Sampler(str(snap), EvalSetting(name="x", steps="ddim4", num=3, precision=precision), "cpu")
        images[precision], labels = sampler.batch([7, 8, 9])
        one, _ = sampler.batch([8])
        np.testing.assert_array_equal(one[0], images[precision][1])
    diff = np.abs(images["bf16"].astype(int) - images["fp32"])
    assert 0 < diff.max() and diff.mean() < 4, (diff.max(), diff.mean())
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2))
    fp32, bf16 = EvalSetting(name="x", num=8), EvalSetting(name="x", num=8, precision="bf16")
    later = ("every_kimg", "keep_samples")  # fields that came later, never part of a key
    old = {k: v for k, v in asdict(fp32).items() if k not in ("name", "shard_size", "batch_size", "precision", *later)}
    old.update(classifier=None, upsampler=None, snapshot=_digest(str(snap)), ref=_digest(str(ref)),
               evaluator=EVALUATOR_VERSION)
    old_key = f"{snap.name}--x--{hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:10]}"
    assert eval_key(snap, fp32, ref) == old_key != eval_key(snap, bf16, ref)
    with pytest.raises(ValueError, match="precision must be fp32, tf32 or bf16"):
        EvalSetting(name="x", precision="fp16")


def test_fp32_sampling_is_true_float32_on_a_gpu_and_tf32_is_asked_for(tmp_path):
    """PyTorch lets cuDNN convolutions run in TF32 by default: precision=fp32 turns TF32 off for the networks'
    calls (and =tf32 on), restoring the caller's settings after. On a CPU tf32 gives fp32's images, under an
    evaluation key of its own."""
    from eval.sample import Sampler
    from eval.settings import EvalSetting, eval_key

    snap = snapshot(tmp_path, "base", "tiny-32", 1)
    images = {}
    for precision, expected in (("fp32", False), ("tf32", True)):
        seen = []
        sampler = Sampler(str(snap), EvalSetting(name="x", steps="ddim3", num=2, precision=precision), "cpu")
        sampler.model.register_forward_pre_hook(
            lambda *_: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
        before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not expected
        try:
            images[precision], _ = sampler.batch([3, 4])
            assert seen and set(seen) == {(expected, expected)}, (precision, seen)
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (not expected,) * 2
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    np.testing.assert_array_equal(images["fp32"], images["tf32"])
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2))
    assert eval_key(snap, EvalSetting(name="x"), ref) != eval_key(snap, EvalSetting(name="x", precision="tf32"), ref)


@pytest.mark.parametrize("steps", ["6", "ddim5"])
def test_progressive_decoding_is_recorded_from_the_shard_itself(tmp_path, steps):
    """The frames watched while a shard is sampled equal the predicted x_0 of the diffusion's own
    progressive loop run separately on the first seeds (picked at evenly spaced steps), and the last
    frame is the shard's own first images."""
    from eval.sample import Sampler
    from eval.settings import EvalSetting
    from models.noise import PerSampleNoise
    from models.sampling import draw_labels

    snap = snapshot(tmp_path, "base", "tiny-32", 1)
    sampler = Sampler(str(snap), EvalSetting(name="x", steps=steps, num=5, batch_size=5), "cpu")
    watch = sampler.watcher(3, frames=4)
    path = sampler.shard([10, 11, 12, 13, 14], tmp_path / "s", watch=watch)
    frames = watch.array()
    assert frames.shape == (4, 3, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[-1], np.load(path)["arr_0"][:3])

    seeds = [10, 11, 12]
    noise = PerSampleNoise(seeds, "cpu")
    loop = sampler.diffusion.ddim_sample_loop_progressive if steps.startswith("ddim") else \
        sampler.diffusion.p_sample_loop_progressive
    alone = list(loop(sampler.model, (3, 3, 32, 32), noise=noise.randn((3, 3, 32, 32)), generator=noise,
                      model_kwargs={"y": draw_labels(seeds, 10)}))
    last = len(alone) - 1
    picks = [0, round(last / 3), round(2 * last / 3)]
    expect = [((alone[i]["pred_xstart"] + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
              for i in picks]
    for got, want in zip(frames[:-1], expect):
        assert np.abs(got.astype(int) - want).max() <= 1  # the same values (a batch of 5 against one of 3)
    assert not np.array_equal(frames[0], frames[-1])
    with pytest.raises(RuntimeError, match="watched 0 of"):
        sampler.watcher(3).array()


def test_a_shard_stopped_midway_samples_again_only_the_batch_it_was_on(tmp_path, monkeypatch):
    """A sampling task stopped inside a shard (its time limit, a preemption) keeps the batches it finished, as
    hidden files no reader takes for shards; the next one samples only the rest, and the shard equals one
    sampled without a stop. A damaged kept batch is sampled again; the kept batches go once the shard is whole."""
    from eval.sample import Sampler, batch_path, finished_shards
    from eval.settings import EvalSetting

    snap = snapshot(tmp_path, "base", "tiny-32", 1)
    seeds = list(range(20, 27))
    whole = np.load(Sampler(str(snap), EvalSetting(name="x", steps="ddim2", num=7, batch_size=3), "cpu")
                    .shard(seeds, tmp_path / "whole"))
    sampler = Sampler(str(snap), EvalSetting(name="x", steps="ddim2", num=7, batch_size=3), "cpu")
    sampled, batch = [], sampler.batch

    def stopped_after(n):
        def sample(chunk, *args):
            if len(sampled) == n:
                raise KeyboardInterrupt  # the time limit's signal
            sampled.append(list(chunk))
            return batch(chunk, *args)
        return sample

    out = tmp_path / "out"
    monkeypatch.setattr(sampler, "batch", stopped_after(2))
    with pytest.raises(KeyboardInterrupt):
        sampler.shard(seeds, out)
    assert sampled == [[20, 21, 22], [23, 24, 25]] and finished_shards(out) == []
    kept = sorted(p.name for p in out.iterdir())
    assert kept == [".samples-00000020-00000026.batch-00000020-00000022.npz",
                    ".samples-00000020-00000026.batch-00000023-00000025.npz"]
    batch_path(out / "samples-00000020-00000026.npz", [23, 24, 25]).write_bytes(b"PK\x03\x04cut")  # damaged
    sampled.clear()
    monkeypatch.setattr(sampler, "batch", stopped_after(9))
    path = sampler.shard(seeds, out)
    assert sampled == [[23, 24, 25], [26]]  # the first batch came from its file
    with np.load(path) as got:
        assert np.array_equal(got["arr_0"], whole["arr_0"]) and np.array_equal(got["arr_1"], whole["arr_1"])
    assert sorted(p.name for p in out.iterdir()) == [path.name]
    # `adm sample` into a directory holding only a stopped shard's batches: they are samples of its setting, so
    # another setting there is refused as for finished shards (they would be taken for its own)
    from eval.sample import claim_out_dir

    stopped = tmp_path / "stopped"
    claim_out_dir(stopped, str(snap), EvalSetting(name="x", steps="ddim2", num=7))  # (writes sampling.json)
    batch_path(stopped / "samples-00000020-00000026.npz", [20, 21, 22]).write_bytes(b"")
    claim_out_dir(stopped, str(snap), EvalSetting(name="x", steps="ddim2", num=7))  # the same setting goes on
    with pytest.raises(ValueError, match=r"holds samples of another snapshot or setting \(steps: 'ddim2' there, "
                                         r"'ddim3' now\)"):
        claim_out_dir(stopped, str(snap), EvalSetting(name="x", steps="ddim3", num=7))
    (stopped / "sampling.json").unlink()
    with pytest.raises(ValueError, match="holds samples without a sampling.json"):
        claim_out_dir(stopped, str(snap), EvalSetting(name="x", steps="ddim3", num=7))


def test_merged_samples_are_streamed_into_one_npz_equal_to_the_concatenation(tmp_path):
    """`adm sample --merge` writes samples.npz a shard at a time (50,000 images at 512x512 are 39 GB: held
    twice by np.concatenate); numpy reads it back as the concatenation, compressed parts included, and the
    temporary file never stays behind. Parts that disagree in image size are refused, naming the file."""
    from eval.atomic import merge_npz_atomic

    rng = np.random.default_rng(0)
    parts, paths = [], []
    for i, n in enumerate((5, 3, 7)):
        x, y = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 1000, n)
        paths.append(tmp_path / f"samples-{i}.npz")
        (np.savez_compressed if i == 1 else np.savez)(paths[-1], arr_0=x, arr_1=y)
        parts.append((x, y))
    merge_npz_atomic(tmp_path / "samples.npz", paths, ("arr_0", "arr_1"))
    with np.load(tmp_path / "samples.npz") as merged:
        np.testing.assert_array_equal(merged["arr_0"], np.concatenate([x for x, _ in parts]))
        np.testing.assert_array_equal(merged["arr_1"], np.concatenate([y for _, y in parts]))
    np.savez(tmp_path / "odd.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="other.npz: arr_0 differs in shape or dtype between its parts"):
        merge_npz_atomic(tmp_path / "other.npz", [paths[0], tmp_path / "odd.npz"], ("arr_0",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.npz", "samples-0.npz", "samples-1.npz",
                                                          "samples-2.npz", "samples.npz"]


@pytest.mark.parametrize("predict_xstart,recorded", [(True, True), (False, True), (True, False)])
def test_a_snapshot_that_predicts_x0_is_sampled_as_one(tmp_path, predict_xstart, recorded):
    """A network trained with diffusion.predict_xstart=true outputs x0, and its snapshot says so: a network
    whose output is 0 everywhere then samples exactly mid-grey by DDIM (x0 = 0 at the last step: 127.5,
    truncated to 127 as ADM quantises), where
    read as ε (the default) the same zeros give the noise scaled up. Snapshots written before the flag was
    recorded beside the steps have it in their training options."""
    cfg = get_preset("tiny-32").config()
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    diffusion = {"steps": 20, "noise_schedule": "linear"}
    meta = ({"diffusion": {**diffusion, "predict_xstart": predict_xstart}} if recorded else
            {"diffusion": diffusion, "training_options": {"diffusion": {**diffusion, "predict_xstart": predict_xstart}}})
    snap = save_snapshot(tmp_path / "s", model.state_dict(), cfg, meta=meta)
    run_cli("sample", str(snap), "--num", "2", "--steps", "ddim4", "--out", str(tmp_path / "out"), "--merge")
    images = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert (images == 127).all() == predict_xstart, np.unique(images)[:8]


def test_sampling_options_are_checked_naming_the_option(tmp_path):
    """The default --steps (250) on a 30-step model names the option and that it is the default; a CUDA
    device where torch sees none is one line; the main EMA answers to its rate's name."""
    cfg = get_preset("tiny-32").config()
    snap = save_snapshot(tmp_path / "s", build_model(cfg).state_dict(), cfg,
                         meta={"diffusion": {"steps": 30, "noise_schedule": "linear"}, "ema_rate": 0.9999})
    bad = run_cli("sample", str(snap), "--num", "1", "--out", str(tmp_path / "o"), check=False)
    assert bad.returncode == 2 and "--steps '250' (the default) does not fit the snapshot's 30-step diffusion" \
        in bad.stderr, bad.stderr
    if not torch.cuda.is_available():
        bad = run_cli("sample", str(snap), "--num", "1", "--steps", "ddim2", "--device", "cuda",
                      "--out", str(tmp_path / "o"), check=False)
        assert bad.returncode == 2 and "--device cuda: torch sees no CUDA GPU here; use --device cpu" in bad.stderr
    assert not (tmp_path / "o").exists()
    for extra, expected in [
        (["--num", "99999999999"], "num 99999999999 in shards of 1000 is 100000000 shards, more than 100000; raise "
                                   "shard_size (--shard-size)"),
        (["--num", "2", "--seed-start", str(2**63 - 1)], "must stay below 2^63 (torch generators' seeds), got "
                                                          f"{2**63 - 1} + 2"),
        (["--device", "mps"], "--device mps: expected cpu or cuda[:N]"),
        (["--device", "gpu:x"], "--device gpu:x: not a torch device"),
        (["--upsampler-steps", "ddim7"], "--upsampler-steps ddim7: give the upsampler with --upsampler SNAPSHOT"),
        (["--batch-size", "0"], "--shard-size and --batch-size must be positive, got 1000 and 0"),
        (["--out", str(snap)], f"--out {snap}: holds manifest.json (a snapshot, dataset or run directory)")]:
        args = ["sample", str(snap), "--num", "1", "--steps", "ddim2", "--out", str(tmp_path / "o"), *extra]
        bad = run_cli(*args, check=False)
        assert bad.returncode == 2 and expected in bad.stderr, bad.stderr
    assert not (tmp_path / "o").exists() and not list(snap.glob("samples-*"))
    run_cli("sample", str(snap), "--num", "1", "--steps", "ddim2", "--weights", "ema_0.9999", "--merge",
            "--out", str(tmp_path / "r"))
    run_cli("sample", str(snap), "--num", "1", "--steps", "ddim2", "--merge", "--out", str(tmp_path / "e"))
    assert np.array_equal(np.load(tmp_path / "r" / "samples.npz")["arr_0"], np.load(tmp_path / "e" / "samples.npz")["arr_0"])


def test_a_damaged_finished_shard_is_said_and_sampled_again(tmp_path):
    snap = snapshot(tmp_path, "base", "tiny-32", 1)
    common = ["sample", str(snap), "--num", "4", "--steps", "ddim2", "--out", str(tmp_path / "a")]
    run_cli(*common)
    shard = tmp_path / "a" / "samples-00000000-00000003.npz"
    before = np.load(shard)["arr_0"]
    for damage in (shard.read_bytes()[:2000], b""):  # cut short (a full disk's copy), emptied
        shard.write_bytes(damage)
        proc = run_cli(*common)
        assert f"{shard}: damaged (" in proc.stderr and "sampling it again" in proc.stderr, proc.stderr
        assert np.array_equal(np.load(shard)["arr_0"], before)
    np.savez(shard, arr_0=before[:2])  # a shard of another split's size
    proc = run_cli(*common)
    assert "arr_0 is uint8 (2, 32, 32, 3), expected 4 uint8 images" in proc.stderr, proc.stderr
    assert np.array_equal(np.load(shard)["arr_0"], before)
    # a flipped bit inside the images (a bad disk, an overwrite): the zip's directory and headers are sound,
    # only a read through against the CRC tells; it was reused, and features then failed with a traceback
    labels = np.load(shard)["arr_1"]
    damaged = bytearray(shard.read_bytes())
    damaged[500] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    proc = run_cli("eval", "features", str(tmp_path / "a"), "--out", str(tmp_path / "f"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{shard}: damaged (Bad CRC-32 for file 'arr_0.npy'); sample it again" in proc.stderr
    proc = run_cli(*common)
    assert f"{shard}: damaged (arr_0.npy: its bytes do not match their CRC); sampling it again" in proc.stderr
    assert np.array_equal(np.load(shard)["arr_0"], before)
    np.savez(shard, arr_0=before, arr_1=labels[:3])  # labels of another count
    assert "damaged (arr_1 has shape (3,), expected 4 labels)" in run_cli(*common).stderr
    assert np.array_equal(np.load(shard)["arr_1"], labels)


def test_an_out_dir_is_resumed_whatever_the_models_paths_and_temporaries(tmp_path, monkeypatch):
    """A killed write's temporary file is not a finished shard (it made the directory count as another
    setting's, or as one without a sampling.json); the same classifier by another path (relative, a link)
    is the same classifier (its digest counts, as the snapshot's does)."""
    from eval.sample import main

    base, clf = snapshot(tmp_path, "base", "tiny-32", 1), snapshot(tmp_path, "clf", "tiny-classifier-32", 2)
    out = tmp_path / "a"
    out.mkdir()
    (out / "sampling.json").write_text(json.dumps({"steps": "30"}))  # a killed run's, of another setting
    (out / "samples-00000000-00000001.npz.partial-host-123-abcdef12.npz").write_bytes(b"PK\x03\x04cut")
    main([str(base), "--num", "2", "--steps", "ddim2", "--out", str(out)])
    assert json.loads((out / "sampling.json").read_text())["steps"] == "ddim2"
    (out / "sampling.json").unlink()
    for p in out.glob("samples-*"):
        p.unlink()
    main([str(base), "--num", "2", "--steps", "ddim2", "--classifier", str(clf), "--out", str(out)])
    shard = out / "samples-00000000-00000001.npz"
    before = shard.stat().st_mtime_ns
    (tmp_path / "link").symlink_to(clf)
    monkeypatch.chdir(tmp_path)
    for other in ("clf", "clf/", "link"):
        main([str(base), "--num", "2", "--steps", "ddim2", "--classifier", other, "--out", str(out)])
    assert shard.stat().st_mtime_ns == before
    other = snapshot(tmp_path, "clf2", "tiny-classifier-32", 3)
    with pytest.raises(ValueError, match="classifier_digest"):  # another classifier is refused, as before
        main([str(base), "--num", "2", "--steps", "ddim2", "--classifier", str(other), "--out", str(out)])


def test_an_out_dir_sampled_on_another_kind_of_device_is_refused(tmp_path):
    """A GPU's generators draw other noise than a CPU's from the same seeds: the device kind is recorded in
    sampling.json, and more samples into that --out on the other kind are refused before any model loads (a
    record from before the kind was kept passes)."""
    from eval.sample import main

    base, out = snapshot(tmp_path, "base", "tiny-32", 1), tmp_path / "o"
    common = [str(base), "--num", "2", "--steps", "ddim2", "--out", str(out)]
    main(common)
    record = json.loads((out / "sampling.json").read_text())
    assert record["device"] == "cpu"
    (out / "sampling.json").write_text(json.dumps({**record, "device": "cuda"}))  # as if sampled on a GPU
    with pytest.raises(ValueError, match=r"another snapshot or setting \(device: 'cuda' there, 'cpu' now\)"):
        main(common + ["--num", "4"])
    del record["device"]
    (out / "sampling.json").write_text(json.dumps(record))
    main(common)  # an earlier version's record: its shards are kept


def test_parts_of_a_seed_split_merge_into_one_npz(tmp_path, capsys):
    """GUIDE: split the work over jobs by --seed-start and --num into one --out. Each part's --merge writes
    every shard there in seed order (it wrote only its own, over the other part's samples.npz), says which
    seeds it holds and which are missing; equal to one run's samples."""
    from eval.sample import main

    base = snapshot(tmp_path, "base", "tiny-32", 1)
    common = [str(base), "--steps", "ddim2", "--shard-size", "2", "--merge"]
    main([*common, "--num", "5", "--out", str(tmp_path / "whole")])
    for start, num in ((0, 2), (4, 1)):
        main([*common, "--seed-start", str(start), "--num", str(num), "--out", str(tmp_path / "parts")])
    assert f"{tmp_path / 'parts' / 'samples.npz'}: 3 images, seeds 0-1, 4-4 (seeds 2-3 missing" in capsys.readouterr().out
    main([*common, "--seed-start", "2", "--num", "2", "--out", str(tmp_path / "parts")])
    assert f"{tmp_path / 'parts' / 'samples.npz'}: 5 images, seeds 0-4\n" in capsys.readouterr().out
    whole, parts = np.load(tmp_path / "whole" / "samples.npz"), np.load(tmp_path / "parts" / "samples.npz")
    assert np.array_equal(whole["arr_0"], parts["arr_0"]) and np.array_equal(whole["arr_1"], parts["arr_1"])


def test_shards_past_10_to_the_8_stay_in_seed_order(tmp_path):
    """Shard names pad seeds to 8 digits: past 10^8 the names' order is not the seeds', and features merged
    in name order would put images out of seed order (the Inception Score's splits, the report's grid)."""
    from eval.features import sample_shards, shard_feature_files

    ranges = [(99_998_000, 99_998_999), (99_999_000, 99_999_999), (100_000_000, 100_000_999)]
    for a, b in ranges:
        (tmp_path / f"samples-{a:08d}-{b:08d}.npz").touch()
        (tmp_path / f"features-{a:08d}-{b:08d}.npz").touch()
    assert [p.name for p in sample_shards(tmp_path)] == [f"samples-{a:08d}-{b:08d}.npz" for a, b in ranges]
    assert [p.name for p in shard_feature_files(tmp_path)] == [f"features-{a:08d}-{b:08d}.npz" for a, b in ranges]


def test_a_sampler_keeps_one_copy_of_the_weights(tmp_path, monkeypatch):
    """The snapshot's loaded tensors are let go once the model holds the weights: they stayed for the whole
    run beside it (twice the host memory: 3.4 GB more for ADM's 512 cascade, per process)."""
    import gc
    import weakref

    import models.snapshot
    from eval.sample import Sampler
    from eval.settings import EvalSetting

    base, up = snapshot(tmp_path, "base", "tiny-32", 1), snapshot(tmp_path, "up", "tiny-upsampler-32-64", 2)
    loaded, load = [], models.snapshot.load_weights

    def watched(path):
        tensors = load(path)
        loaded.extend(weakref.ref(t) for t in tensors.values())
        return tensors

    monkeypatch.setattr(models.snapshot, "load_weights", watched)
    sampler = Sampler(str(base), EvalSetting(name="x", steps="ddim2", num=2, upsampler=str(up)))
    gc.collect()
    assert loaded and not [r for r in loaded if r() is not None]
    images, _ = sampler.batch([0])  # and it samples
    assert images.shape == (1, 64, 64, 3)


def test_a_cascade_is_its_base_samples_upsampled(tmp_path):
    """A cascade's images are exactly those of sampling the base model, then upsampling those samples as
    --base-samples does (the farm reuses a base evaluation's samples on this ground): the upsampler's noise
    is a stream of its own per seed, not the rest of the base model's."""
    from eval.base_samples import BaseSamples
    from eval.sample import Sampler
    from eval.settings import EvalSetting

    base, up = snapshot(tmp_path, "base", "tiny-32", 1), snapshot(tmp_path, "up", "tiny-upsampler-32-64", 3)
    common = dict(steps="ddim3", num=4, batch_size=4)
    seeds = [5, 6, 7, 8]
    cascade = Sampler(str(base), EvalSetting(name="c", upsampler=str(up), upsampler_steps="ddim3", **common), "cpu")
    high = np.load(cascade.shard(seeds, tmp_path / "cascade"))
    low = np.load(Sampler(str(base), EvalSetting(name="b", **common), "cpu").shard(seeds, tmp_path / "base-samples"))
    np.savez(tmp_path / "rows.npz", np.concatenate([np.zeros((5, 32, 32, 3), np.uint8), low["arr_0"]]),
             np.concatenate([np.zeros(5, np.int64), low["arr_1"]]))  # row i is seed i
    rows = BaseSamples(tmp_path / "rows.npz", 32, 10, 5, 4)
    again = np.load(Sampler(str(up), EvalSetting(name="u", **common), "cpu", base=rows).shard(seeds, tmp_path / "up"))
    np.testing.assert_array_equal(again["arr_0"], high["arr_0"])
    np.testing.assert_array_equal(again["arr_1"], high["arr_1"])
    assert high["arr_0"].shape == (4, 64, 64, 3) and high["arr_1"].tolist() == draw_labels(seeds, 10).tolist()


def test_base_samples_are_upsampled_row_by_seed_like_adms_super_res_sample(tmp_path):
    """`adm sample UPSAMPLER --base-samples FILE`: row i of an earlier sample batch upsampled with seed i. Checked
    per image against the upsampler's own DDIM loop called in the test on that row alone, with that seed's
    upsampler noise stream; a --seed-start split gives the same images; bad files and options are refused before sampling."""
    from models.adm_compat import diffusion_from_preset
    from models.noise import PerSampleNoise
    from models.sampling import upsampler_seed
    from models.snapshot import load_snapshot

    up = snapshot(tmp_path, "up", "tiny-upsampler-32-64", 3)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), np.array([3, 1, 4, 1, 5])
    np.savez(tmp_path / "base.npz", images, labels)
    common = ["sample", str(up), "--base-samples", str(tmp_path / "base.npz"), "--steps", "ddim3", "--batch-size", "2"]
    run_cli(*common, "--num", "5", "--shard-size", "3", "--out", str(tmp_path / "a"), "--merge")
    got = np.load(tmp_path / "a" / "samples.npz")
    assert got["arr_0"].shape == (5, 64, 64, 3) and got["arr_1"].tolist() == labels.tolist()

    snap = load_snapshot(up)
    model = snap.build("cpu")
    diffusion = diffusion_from_preset(snap.meta["diffusion"], snap.config.learn_sigma, "ddim3")
    for i in range(5):
        noise = PerSampleNoise([upsampler_seed(i)], "cpu")  # (splitmix64's first output from state i)
        low = torch.from_numpy(images[i:i + 1]).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = diffusion.ddim_sample_loop(model, (1, 3, 64, 64), noise=noise.randn((1, 3, 64, 64)), generator=noise,
                                       model_kwargs={"low_res": low, "y": torch.tensor(labels[i:i + 1])})
        want = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.abs(want.astype(int) - got["arr_0"][i:i + 1]).max() <= 1, i
    run_cli(*common, "--num", "2", "--seed-start", "3", "--out", str(tmp_path / "b"), "--merge")
    part = np.load(tmp_path / "b" / "samples.npz")
    assert np.abs(part["arr_0"].astype(int) - got["arr_0"][3:]).max() <= 1 and part["arr_1"].tolist() == [1, 5]

    np.savez(tmp_path / "fortran.npz", np.asfortranarray(images), labels)  # numpy stores it column-major
    run_cli("sample", str(up), "--base-samples", str(tmp_path / "fortran.npz"), "--steps", "ddim3", "--num", "2",
            "--out", str(tmp_path / "f"), "--merge")
    assert np.abs(np.load(tmp_path / "f" / "samples.npz")["arr_0"].astype(int) - got["arr_0"][:2]).max() <= 1

    np.savez(tmp_path / "small.npz", images[:, :16, :16], labels)
    np.savez(tmp_path / "nolabels.npz", images)
    np.savez(tmp_path / "other.npz", images[::-1].copy(), labels)
    np.savez(tmp_path / "badlabel.npz", images, np.array([3, 1, 10, 1, 5]))
    base = snapshot(tmp_path, "base", "tiny-32", 1)
    for args, expected in [
        (["--base-samples", str(tmp_path / "small.npz"), "--num", "2"],
         "arr_0 is uint8 (5, 16, 16, 3); the upsampler takes uint8 images of 32x32x3"),
        (["--base-samples", str(tmp_path / "base.npz"), "--num", "3", "--seed-start", "4"],
         "asks for rows 4 to 6 of --base-samples"),
        (["--base-samples", str(tmp_path / "nolabels.npz"), "--num", "2"],
         "no arr_1 (labels), and the upsampler is class-conditional (10 classes)"),
        (["--base-samples", str(tmp_path / "badlabel.npz"), "--num", "5"],
         "arr_1[2] is 10, outside the upsampler's 10 classes"),
        (["--base-samples", str(tmp_path / "other.npz"), "--num", "5", "--shard-size", "3", "--out", str(tmp_path / "a")],
         "holds samples of another snapshot or setting (base_samples_digest:"),
    ]:
        proc = run_cli("sample", str(up), *args, *([] if "--out" in args else ["--out", str(tmp_path / "e")]),
                       check=False)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_cli("sample", str(base), "--base-samples", str(tmp_path / "base.npz"), "--num", "2", "--out",
                   str(tmp_path / "e"), check=False)
    assert proc.returncode == 2 and "a unet snapshot; --base-samples are upsampled by an upsampler" in proc.stderr
    proc = run_cli(*common, "--num", "2", "--upsampler", str(up), "--out", str(tmp_path / "e"), check=False)
    assert proc.returncode == 2 and "--classifier and --upsampler belong to a cascade" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_cpu_sampling_runs_the_diffusion_networks_channels_last(tmp_path):
    """On a CPU a Sampler's base model and upsampler run channels-last (faster there), its classifier contiguous
    (its guidance gradient is slower channels-last); the images are those of the networks as built (NCHW) to
    float rounding, one level at most, and the farm's record of what images are a function of names the layout."""
    from eval.farm import images_identity
    from eval.sample import Sampler, _diffusion, load_model, quantize
    from eval.settings import EvalSetting
    from models.guidance import classifier_cond_fn
    from models.sampling import sample_cascade
    from models.snapshot import load_snapshot

    base = snapshot(tmp_path, "base", "tiny-32", 1)
    clf = snapshot(tmp_path, "clf", "tiny-classifier-32", 2)
    up = snapshot(tmp_path, "up", "tiny-upsampler-32-64", 3)
    setting = EvalSetting(name="c", steps="ddim3", scale=2.0, classifier=str(clf), upsampler=str(up),
                          upsampler_steps="ddim3")
    sampler = Sampler(str(base), setting, "cpu")

    def first_conv(model):
        return next(p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1)

    for model in (sampler.model, sampler.up):
        assert first_conv(model).is_contiguous(memory_format=torch.channels_last)
    clf_conv = first_conv(load_model(str(clf), "cpu")[0])
    assert clf_conv.is_contiguous() and not clf_conv.is_contiguous(memory_format=torch.channels_last)
    seeds = [3, 4, 5]
    images, labels = sampler.batch(seeds)
    snaps = {name: load_snapshot(str(path)) for name, path in (("base", base), ("clf", clf), ("up", up))}
    built = {name: snap.build("cpu") for name, snap in snaps.items()}  # NCHW, as models.snapshot builds them
    high, _, plain_labels = sample_cascade(
        built["base"], _diffusion(snaps["base"], "ddim3"), built["up"], _diffusion(snaps["up"], "ddim3"), seeds,
        base_size=32, large_size=64, num_classes=10, cond_fn=classifier_cond_fn(built["clf"], 2.0), use_ddim=True,
        upsampler_ddim=True)
    assert np.abs(quantize(high).astype(int) - images).max() <= 1 and labels.tolist() == plain_labels.tolist()
    spec = {"snapshot": str(base)}
    assert images_identity(spec, setting, device="cpu")["layout"] == "channels_last"
    assert images_identity(spec, setting, device="cuda")["layout"] == "contiguous"
