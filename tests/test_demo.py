"""Proof that it learns: the README's demo, run with its own settings, and checks of what it produced
against independent oracles (scikit-learn's SVC on the 8x8 digits, FID between real digit sets,
the upsampler's round trip)."""

import time

import numpy as np
import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.slow

FID_FACTOR = 4.0  # the last snapshot's FID is within this factor of the FID between real digit sets


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    start = time.time()
    proc = run_cli("demo", "--out", str(out))
    print(next((line for line in proc.stdout.splitlines() if line.startswith("Done in")), "no summary line"))
    return out, proc.stdout, time.time() - start


def results(out):
    from eval.registry import results as read

    return read(out / "runs" / "diffusion")


def by(rows, setting):
    return sorted((r for r in rows if r["setting"]["name"] == setting), key=lambda r: r["images"])


def test_demo_runs_everything_and_reuses_its_work(demo):
    out, stdout, _ = demo
    assert "sending the preemption signal" in stdout and "resumes from LATEST" in stdout.replace("\n", " ")
    assert "[resume]" in stdout or "resumed" in stdout
    html = (out / "report.html").read_text()
    for needle in ("Progressive decoding", "guided-s4", "cascade-32", "unguided", "data:image/png;base64,",
                   "The cascade's stages", "16x16 base", "32x32 upsampled"):
        assert needle in html
    rows = results(out)
    from test_report_parts import report_figures

    from eval.features import sample_shards
    from eval.report import kimg
    shown = report_figures(html)  # every grid's samples captioned with their digit, by name from the shards' class table
    for r in rows:
        with np.load(sample_shards(out / "runs" / "diffusion" / "eval" / r["key"] / "samples")[0]) as data:
            labels = data["arr_1"][:16]
        assert [c for _, _, c in shown[f"{r['snapshot_name']} ({kimg(r['images'])} kimg), {r['label']}"]] == [
            f"digit {k}" for k in labels]
    assert len(by(rows, "unguided")) == 3 and len(by(rows, "guided-s1")) == 2 and len(by(rows, "cascade-32")) == 2
    start = time.time()
    again = run_cli("demo", "--out", str(out)).stdout
    assert "Open" in again and time.time() - start < 90  # everything reused


def test_fid_falls_to_near_the_real_data_level(demo):
    """FID of the last snapshot vs held-out digits: well below the first snapshot's, and within
    FID_FACTOR of the FID between 100 real training digits and the same held-out digits."""
    from data_pipeline.loader import StreamLoader
    from eval.compare import compare

    out, _, _ = demo
    unguided = by(results(out), "unguided")
    first, last = unguided[0]["metrics"]["fid"], unguided[-1]["metrics"]["fid"]
    batch = next(iter(StreamLoader(out / "shards" / "train16", 16, 100, flip=False, num_slots=1)))
    real = ((batch["image"] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(out / "real100.npz", arr_0=real)
    floor = compare(str(out / "eval" / "heldout16.npz"), str(out / "real100.npz"))["fid"]
    print(f"FID first {first:.1f}, last {last:.1f}, real digits {floor:.1f}")
    assert last < 0.6 * first
    assert last < FID_FACTOR * floor


def svc_on_8x8_digits():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001).fit(digits.data, digits.target)


def to_8x8(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 16, 16, 3) -> sklearn's digit features: 8x8 ink levels 0..16 (grey, each image's
    contrast stretched to the full range, as the scanned digits are)."""
    grey = images.astype(np.float64).mean(-1)
    n, h, w = grey.shape
    small = grey.reshape(n, 8, h // 8, 8, w // 8).mean((2, 4)).reshape(n, 64)
    lo, hi = small.min(1, keepdims=True), small.max(1, keepdims=True)
    return (small - lo) / np.maximum(hi - lo, 1e-6) * 16


def accuracy(clf, key_dir) -> float:
    shards = sorted((key_dir / "samples").glob("samples-*.npz"))
    x = np.concatenate([np.load(s)["arr_0"] for s in shards])
    y = np.concatenate([np.load(s)["arr_1"] for s in shards])
    return float((clf.predict(to_8x8(x)) == y).mean())


def test_classifier_guidance_makes_samples_their_class(demo):
    """An independent digit classifier (an SVC fitted on scikit-learn's 8x8 digits) labels samples as
    their requested class more often with classifier guidance than without (the class-conditional
    model alone), pooled over the two guided snapshots (200 samples per setting). Measured 2026-12-02
    (demo model with multipliers 1,1,2): at 48 kimg 0.515 unguided, 0.675 at scale 1, 0.685 at scale 4;
    at 32 kimg (the default since) 0.315, 0.52, 0.675."""
    out, _, _ = demo
    clf = svc_on_8x8_digits()
    rows = results(out)
    guided_snaps = {r["snapshot_name"] for r in rows if r["setting"]["name"] == "guided-s4"}
    eval_root = out / "runs" / "diffusion" / "eval"
    acc = {}
    for name in ("unguided", "guided-s1", "guided-s4"):
        keys = [r["key"] for r in rows if r["setting"]["name"] == name and r["snapshot_name"] in guided_snaps]
        acc[name] = float(np.mean([accuracy(clf, eval_root / k) for k in keys]))
    print("SVC accuracy on the requested labels:", acc)
    assert acc["guided-s4"] > acc["unguided"] + 0.04
    assert acc["unguided"] > 0.3  # the conditional model alone is already far above chance (0.1)


def test_guidance_at_scale_zero_changes_nothing(demo):
    """The classifier's gradient times 0 leaves sampling unchanged: bit for bit in ancestral sampling
    (ADM adds variance * gradient to the mean), and to float rounding in DDIM, where ADM's
    condition_score turns the clipped x0 into eps and back (x0 -> eps -> x0 is exact in real numbers,
    not in float32: measured here 1 pixel in 3,072 one quantization level off)."""
    from eval.sample import Sampler
    from eval.settings import EvalSetting
    from models.guidance import classifier_cond_fn
    from models.sampling import draw_labels, sample_images

    out, _, _ = demo
    snap = sorted((out / "runs" / "diffusion" / "snapshots").iterdir())[-1]
    clf_snap = sorted((out / "runs" / "classifier" / "snapshots").iterdir())[-1]
    zero = classifier_cond_fn(_classifier(clf_snap), 0.0)  # the classifier's gradient, times 0
    seeds = [0, 1, 2, 3]
    for steps in ("10", "ddim10"):
        sampler = Sampler(str(snap), EvalSetting(name="x", steps=steps, num=4), "cpu")
        labels = draw_labels(seeds, 10, "cpu")
        kw = dict(labels=labels, use_ddim=sampler.use_ddim)
        plain, _ = sample_images(sampler.model, sampler.diffusion, seeds, 16, **kw)
        guided, _ = sample_images(sampler.model, sampler.diffusion, seeds, 16, cond_fn=zero, **kw)
        if steps == "10":
            torch.testing.assert_close(guided, plain, rtol=0, atol=0)
        else:
            torch.testing.assert_close(guided, plain, rtol=0, atol=1e-5)


def _classifier(path):
    from models.snapshot import load_snapshot

    return load_snapshot(path).build("cpu")


def upsample_heldout(out, n: int):
    """The first n held-out 16x16 digits (in [-1, 1]) and the last upsampler snapshot's 32x32 outputs for them,
    sampled as the demo's cascades sample (25 ancestral steps, the schedule the snapshot records)."""
    from data_pipeline.loader import StreamLoader
    from models.adm_compat import create_gaussian_diffusion
    from models.noise import PerSampleNoise
    from models.snapshot import load_snapshot

    snap = load_snapshot(sorted((out / "runs" / "upsampler" / "snapshots").iterdir())[-1])
    model = snap.build("cpu")
    d = snap.meta["diffusion"]
    diffusion = create_gaussian_diffusion(steps=d["steps"], noise_schedule=d["noise_schedule"],
                                          learn_sigma=snap.config.learn_sigma, timestep_respacing="25")
    batch = next(iter(StreamLoader(out / "shards" / "val16", 16, n, flip=False, num_slots=1)))
    noise = PerSampleNoise(list(range(n)), "cpu")
    with torch.no_grad():
        high = diffusion.p_sample_loop(model, (n, 3, 32, 32), noise=noise.randn((n, 3, 32, 32)),
                                       model_kwargs={"low_res": batch["image"], "y": batch["label"]}, generator=noise)
    return batch["image"], high


def test_upsampler_outputs_downsample_to_their_inputs(demo):
    """Real held-out 16x16 digits through the upsampler to 32x32, area-downsampled back: close to the
    input, and much closer to it than to another digit. Compared with each image's per-channel mean
    removed: at the demo's budget (375 steps) the models still add a per-image brightness offset (the
    low-frequency part of the noise is the last thing they learn to remove), and that offset is
    checked separately, loosely. The digits are grey (R = G = B), so outputs must stay grey: an
    upsampler whose output GroupNorm has one channel per group cannot keep an image's channel means,
    and tinted them by 20/255 on average."""
    out, _, _ = demo
    low, high = upsample_heldout(out, 16)
    back = torch.nn.functional.avg_pool2d(high, 2)

    def structure(z):
        return z - z.mean((2, 3), keepdim=True)

    same = (structure(back) - structure(low)).abs().mean().item()
    other = (structure(back) - structure(low.roll(1, 0))).abs().mean().item()
    print(f"round trip (per-channel means removed): {same:.4f} to its own input, {other:.4f} to another digit")
    assert same < 0.2 and same < other / 3
    assert (back - low).abs().mean().item() < (back - low.roll(1, 0)).abs().mean().item()
    means = high.mean((2, 3)) * 127.5  # per image and channel, in 8-bit levels
    tint = (means - means.mean(1, keepdim=True)).abs().mean().item()
    print(f"tint: channel means {tint:.1f}/255 from their grey on average")
    assert tint < 8


def test_upsampler_beats_pixel_replication_by_far(demo):
    """100 held-out 16x16 digits upsampled to 32x32 by the demo's upsampler score a FID against the 200
    held-out 32x32 digits (the cascades' reference) well below what the same digits score with each pixel
    repeated 2x2. Measured 2026-12-07 (session 34, fp32): replication 247.3, the demo's upsampler 94.3. Scored
    with 8-bit rounding instead of the farm's truncation (bench/RESULTS.md: replication 246.6): 94.8 with the
    cosine noise schedule the demo trains it with (112.7 with training seed 1), 161.9 with ADM's linear one, which
    left grey backgrounds (110.4 with seed 1). At the demo's budget (375 steps) the FID moves a lot with the seed
    and small changes (EMA 0.99: 143.9 and 176.1; the learning rate decayed: 158.9 and 165.9), and a machine with
    native bf16 trains another trajectory, hence the bound at 0.75x."""
    from eval.compare import compare
    from eval.sample import quantize

    out, _, _ = demo
    low, high = upsample_heldout(out, 100)

    def to_npz(x, name):  # 8-bit as the farm writes its samples
        np.savez(out / name, arr_0=quantize(x))
        return str(out / name)

    ref = str(out / "eval" / "heldout32.npz")
    upsampled = compare(ref, to_npz(high, "upsampled-heldout.npz"))["fid"]
    replicated = compare(ref, to_npz(low.repeat_interleave(2, 2).repeat_interleave(2, 3), "replicated-heldout.npz"))["fid"]
    print(f"FID against the held-out 32x32 digits: upsampler {upsampled:.1f}, pixel replication {replicated:.1f}")
    assert upsampled < 0.75 * replicated
