"""FID / sFID / precision / recall: formulas against independent computations, exact merging."""

import concurrent.futures
import hashlib
import json
import threading

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import run_cli
from eval.comm import Single
from eval.inception import SHA1, extract, weights_path
from eval.precision_recall import precision_recall, radii
from eval.stats import Statistics, frechet_distance


def random_cov(d, rng):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_adm_sqrtm_formula():
    rng = np.random.default_rng(0)
    for d in (5, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_cov(d, rng), random_cov(d, rng)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real  # ADM's evaluator's method
        expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
        # the reference's square root given (as cached per reference file): scipy's root, an independent one
        root = scipy.linalg.sqrtm(s2).real
        assert frechet_distance(mu1, s1, mu2, s2, sqrt_sigma2=root) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # the evaluation's case: few samples in many dimensions, so the samples' covariance is singular
    d, n = 96, 20
    x = rng.normal(size=(n, d)) * 2 + 1
    s1, mu1 = np.cov(x, rowvar=False), x.mean(0)
    mu2, s2 = rng.normal(size=d), random_cov(d, rng)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_statistics_merge_exactly():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 16)) * 3 + 1
    whole = Statistics.of(x)
    parts = Statistics.empty(16)
    for chunk in np.array_split(x, 7):
        parts = parts.merge(Statistics.of(chunk))
    np.testing.assert_allclose(parts.mu, x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(parts.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(parts.sigma, whole.sigma, rtol=1e-12, atol=1e-12)
    back = Statistics.from_npz(parts.to_npz())
    assert back.n == 1000


@pytest.mark.parametrize("shards", [1, 3])
def test_compacted_features_hold_what_the_shards_held(tmp_path, shards):
    """After the metrics, the shards' feature files become one merged file: the same pool features (in seed
    order), labels and statistics as numpy computes them from all the features, and nothing else is left."""
    from eval.features import MERGED, compact, load_features, write_features

    rng = np.random.default_rng(2)
    pool, spatial = rng.normal(size=(10, 2048)).astype(np.float32), rng.normal(size=(10, 2023)).astype(np.float32)
    labels = rng.integers(0, 10, 10)
    for i, rows in enumerate(np.array_split(np.arange(10), shards)):
        write_features(tmp_path / f"features-{i:08d}-{i:08d}.npz", pool[rows], labels[rows], 16,
                       Statistics.of(pool[rows]), Statistics.of(spatial[rows]))
    compact(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [MERGED]
    f = load_features(tmp_path, expected=10)
    np.testing.assert_array_equal(f["pool"], pool)
    np.testing.assert_array_equal(f["labels"], labels)
    assert f["resolution"] == 16
    for stats, x in ((f["pool_stats"], pool), (f["spatial_stats"], spatial)):
        np.testing.assert_allclose(stats.mu, x.astype(np.float64).mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


class ThreadComm(Single):
    """A worker of a group of threads in this process: rows and all-gather as eval.comm's workers do them."""

    def __init__(self, rank, size, slots, barrier):
        self.rank, self.size, self.slots, self.barrier = rank, size, slots, barrier

    def allgather(self, obj) -> list:
        self.slots[self.rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out


def as_workers(size, fn) -> list:
    """fn(comm) run by `size` workers at once; their results, by rank."""
    slots, barrier = [None] * size, threading.Barrier(size, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(size) as pool:
        return list(pool.map(lambda rank: fn(ThreadComm(rank, size, slots, barrier)), range(size)))


def brute_pr(ref, sample, k=3):
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_sam = np.sort(d2(sample, sample), axis=1)[:, k]
    precision = (d2(sample, ref) <= r_ref[None, :]).any(1).mean()
    recall = (d2(ref, sample) <= r_sam[None, :]).any(1).mean()
    return precision, recall


@pytest.mark.parametrize("block", [7, 50, 10000])
def test_precision_recall_exact_at_any_block_size(block):
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(120, 8)).astype(np.float32)
    sample = (rng.normal(size=(90, 8)) * 1.3 + 0.4).astype(np.float32)
    p, r = precision_recall(ref, sample, block=block)
    bp, br = brute_pr(ref.astype(np.float64), sample.astype(np.float64))
    assert (p, r) == pytest.approx((bp, br), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1
    # radii are float64 distances of the pair itself: identical at any block size
    np.testing.assert_array_equal(radii(ref, block=block), radii(ref, block=1000))
    d2 = ((ref[:, None, :].astype(np.float64) - ref[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(radii(ref, block=block), np.sort(d2, axis=1)[:, 3], rtol=1e-12)
    p16, r16 = precision_recall(ref, sample, block=block, distance="fp16")
    assert abs(p16 - p) < 0.05 and abs(r16 - r) < 0.05
    assert as_workers(3, lambda comm: precision_recall(ref, sample, block=block, distance="fp16", comm=comm)) == \
        [(p16, r16)] * 3


def test_inception_weights_and_features():
    path = weights_path()
    assert hashlib.sha1(path.read_bytes()).hexdigest() == SHA1
    rng = np.random.default_rng(3)
    images = (rng.random((6, 48, 40, 3)) * 255).astype(np.uint8)
    a = extract(images, batch_size=6, device="cpu")
    b = extract(images, batch_size=2, device="cpu")
    assert a["pool"].shape == (6, 2048) and a["spatial"].shape == (6, 2023)
    np.testing.assert_allclose(a["pool"], b["pool"], rtol=1e-4, atol=1e-5)  # batch size does not matter
    assert (a["pool"] >= 0).all()  # pool_3 follows a ReLU and an average pool
    with pytest.raises(ValueError, match="uint8 images"):
        extract(images.astype(np.float32))


def test_inception_batch_follows_free_gpu_memory(monkeypatch):
    """On a GPU the batch is half the free memory over a per-image bound (a multiple of 8, 8 to 512), and
    never above a size that ran out of memory before; on a CPU 32. The bound holds: the largest input +
    output of any layer, measured with hooks on a real forward pass (299 and a 512 input to resize), is at
    most a quarter of it."""
    import eval.inception as inc

    gib = 1 << 30
    for free, want in ((80 * gib, 512), (8 * gib, 128), (3 * gib, 48), (100 << 20, 8)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (f, 80 * gib))
        assert inc.default_batch_size(torch.device("cuda", 0)) == want
        assert want == max(8, min(512, free // 2 // inc.PER_IMAGE_BYTES // 8 * 8))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * gib, 80 * gib))
    monkeypatch.setitem(inc._FITTED, "cuda:0", 24)
    assert inc.default_batch_size("cuda:0") == 24 and inc.default_batch_size("cpu") == 32

    net, peak = inc.network("cpu"), [0]

    def hook(module, inputs, output):
        peak[0] = max(peak[0], 4 * (sum(t[:1].numel() for t in inputs if torch.is_tensor(t)) + output[:1].numel()))
    hooks = [m.register_forward_hook(hook) for m in net.modules()
             if m is not net and not isinstance(m, torch.jit.ScriptModule)]
    try:
        for size in (299, 512):
            net(np.zeros((2, size, size, 3), np.uint8))
    finally:
        for h in hooks:
            h.remove()
    assert 4 << 20 < peak[0] <= inc.PER_IMAGE_BYTES // 4


def test_default_device_is_the_ranks_own_gpu(monkeypatch):
    """Features, precision/recall and sampling go to the GPU of the process's local rank (torchrun's
    LOCAL_RANK, Open MPI's and MPICH's local ranks, srun's SLURM_LOCALID), modulo the GPUs it sees; cpu without
    one."""
    from eval.inception import LOCAL_RANK_VARS, default_device

    for k in LOCAL_RANK_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert default_device() == torch.device("cuda", 2)
    monkeypatch.setenv("MPI_LOCALRANKID", "3")  # mpiexec (MPICH's Hydra) inside an allocation wins over srun's
    assert default_device() == torch.device("cuda", 3)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert default_device() == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "6")  # torchrun's wins; one GPU per task seen as cuda:0 under srun
    assert default_device() == torch.device("cuda", 2)
    from eval.sample import Sampler
    from eval.settings import EvalSetting

    monkeypatch.setattr("eval.sample.load_model", lambda *a: (_ for _ in ()).throw(LookupError(a[1])))
    with pytest.raises(LookupError, match="cuda:2"):  # sampling picks the same GPU (stopped before loading)
        Sampler("snap", EvalSetting(name="x"))


def test_inception_batch_halves_when_out_of_memory(monkeypatch):
    """A batch that raises out-of-memory is halved and run again: the same features as one image at a time,
    the smaller size kept for the process, a warning; at batch 1 the error is the caller's."""
    import eval.inception as inc

    real = inc.network("cpu")

    class Tight(torch.nn.Module):  # a GPU that holds 3 images
        device = real.device

        def forward(self, images):
            if len(images) > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(images)

    monkeypatch.setattr(inc, "_FITTED", {})
    images = (np.random.default_rng(5).random((7, 40, 40, 3)) * 255).astype(np.uint8)
    seen = []
    with pytest.warns(UserWarning, match="out of memory, batch lowered to 2"):
        got = inc.forward_fitting(Tight(), images, 8, seen.append)
    one = [real(images[i:i + 1]) for i in range(7)]
    for k in ("pool", "spatial"):
        np.testing.assert_allclose(got[k], np.concatenate([o[k].numpy() for o in one]), rtol=1e-4, atol=1e-5)
    assert seen == [2, 2, 2, 1] and inc._FITTED == {"cpu": 2}

    class Full(Tight):
        def forward(self, images):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    with pytest.warns(UserWarning), pytest.raises(torch.OutOfMemoryError):
        inc.forward_fitting(Full(), images[:2], 2)


def test_features_and_distances_run_without_tf32_and_leave_the_callers_setting(monkeypatch):
    """The network (called directly, as `adm eval ref` does, or through extract) and precision/recall run
    with TF32 off; the caller's setting is back afterwards (the local farm samples on in the same process)."""
    from eval import precision_recall as pr
    from eval.inception import network

    seen = []
    net = network("cpu")
    first = next(iter(net.layers.values()))
    hook = first.register_forward_pre_hook(lambda *_: seen.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
    real_approx = pr._approx
    monkeypatch.setattr(pr, "_approx", lambda *a: seen.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)) or real_approx(*a))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        images = np.zeros((2, 32, 32, 3), np.uint8)
        net(images), extract(images, device="cpu")
        feats = np.random.default_rng(0).random((8, 16)).astype(np.float32)
        precision_recall(feats, feats[::-1].copy()), radii(feats)
        after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        hook.remove()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert len(seen) > 4 and set(seen) == {(False, False)} and after == (True, True)


def test_features_equal_the_whole_torchscript_module_and_spatial_is_nhwc():
    """pool_3 from extract() equals the wheel's TorchScript module called as a whole (its own forward) on
    the same TF1-style resize and (x - 128) / 128; the 2023 spatial features are mixed_6/conv's first 7
    channels flattened in TensorFlow's NHWC order, checked against that conv's output read back index by
    index."""
    import warnings

    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    rng = np.random.default_rng(11)
    images = (rng.random((3, 37, 29, 3)) * 255).astype(np.uint8)
    ours = extract(images, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        whole = torch.jit.load(str(weights_path()), map_location="cpu").eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
    with torch.no_grad():
        pool = whole(x).numpy()
        h = x
        for name, layer in whole.net.layers.named_children():
            if name == "mixed_6":
                conv = layer.conv(h).numpy()  # (N, 192, 17, 17)
                break
            h = layer(h)
    np.testing.assert_allclose(ours["pool"], pool, rtol=1e-5, atol=1e-5)
    assert conv.shape[1:] == (192, 17, 17)
    for n, y, x_, c in [(0, 0, 0, 0), (1, 0, 1, 0), (2, 1, 0, 6), (0, 16, 16, 6), (1, 5, 11, 3)]:
        assert ours["spatial"][n, (y * 17 + x_) * 7 + c] == pytest.approx(conv[n, c, y, x_], rel=1e-5, abs=1e-5)
    nhwc = conv[:, :7].transpose(0, 2, 3, 1).reshape(3, 2023)
    np.testing.assert_allclose(ours["spatial"], nhwc, rtol=1e-5, atol=1e-5)


def test_compare_cli_on_real_digits(tmp_path):
    from sklearn.datasets import load_digits
    from PIL import Image

    digits = load_digits()
    imgs = np.stack([np.asarray(Image.fromarray((im / 16 * 255).astype(np.uint8)).resize((32, 32)).convert("RGB"))
                     for im in digits.images[:64]])
    np.savez(tmp_path / "ref.npz", arr_0=imgs[:32])
    np.savez(tmp_path / "same.npz", arr_0=imgs[32:64], arr_1=digits.target[32:64])
    noise = (np.random.default_rng(4).random((32, 32, 32, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    run_cli("eval", "compare", str(tmp_path / "ref.npz"), str(tmp_path / "same.npz"), "--json", str(tmp_path / "a.json"))
    run_cli("eval", "compare", str(tmp_path / "ref.npz"), str(tmp_path / "noise.npz"), "--json",
            str(tmp_path / "new" / "dir" / "b.json"))  # its folder is made
    same, noisy = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "new/dir/b.json").read_text())
    assert set(same) == {"fid", "sfid", "precision", "recall"}
    assert same["fid"] < noisy["fid"] / 5 and same["sfid"] < noisy["sfid"]
    assert same["precision"] > 0.5 and noisy["precision"] < 0.1
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
    np.savez(tmp_path / "stats.npz", **stats)
    out = run_cli("eval", "compare", str(tmp_path / "stats.npz"), str(tmp_path / "same.npz")).stdout
    assert "fid:" in out and "precision: not computed (needs images (arr_0) in both files)" in out  # and said why
    assert "sfid: not computed" in out and "inception_score" not in out  # IS was not asked for
    bad = run_cli("eval", "compare", str(tmp_path / "missing.npz"), str(tmp_path / "same.npz"), check=False)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def near_ties():
    """Points placed so that many distances sit within float32 rounding of a radius."""
    rng = np.random.default_rng(7)
    base = np.abs(rng.normal(size=(60, 256))).astype(np.float32) * 4
    ref = np.concatenate([base, base + np.float32(1e-3) * rng.normal(size=base.shape).astype(np.float32)])
    return ref, np.concatenate([ref[::2] + np.float32(2e-3), ref[1::3]]).astype(np.float32)


def test_exact_radii_and_memberships_on_near_ties():
    """Points placed so that many distances sit within float32 rounding of a radius: the float32 filter
    must hand those to the float64 check, at any block size and for any row split (workers)."""
    ref, sample = near_ties()
    bp, br = brute_pr(ref.astype(np.float64), sample.astype(np.float64))
    d2 = ((ref[:, None, :].astype(np.float64) - ref[None, :, :]) ** 2).sum(-1)
    want = np.sort(d2, axis=1)[:, 3]
    for block in (5, 17, 1000):
        got = radii(ref, block=block)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert precision_recall(ref, sample, block=block) == pytest.approx((bp, br), abs=1e-12)
        for workers in (2, 3, 7):  # 1000: one diagonal block, so all but one worker get no block at all
            for split in as_workers(workers, lambda comm: radii(ref, block=block, comm=comm)):
                np.testing.assert_array_equal(split, got)
            for pr in as_workers(workers, lambda comm: precision_recall(ref, sample, block=block, comm=comm)):
                assert pr == pytest.approx((bp, br), abs=1e-12)


def test_identical_rows_keep_the_exact_work_small_and_the_results_exact(monkeypatch):
    """A diverged snapshot samples hundreds of identical (all-black) images: every pair of them is within the
    float32 error, so without care all n^2 pairs go to the float64 check. Kept to k+1 copies of each row,
    the results equal brute force's, at any block size and worker count, and the float64 work stays small."""
    import eval.precision_recall as pr
    rng = np.random.default_rng(11)
    black = np.abs(rng.normal(size=(1, 64))).astype(np.float32)
    sample = np.concatenate([np.repeat(black, 300, 0), np.abs(rng.normal(size=(40, 64))).astype(np.float32),
                             np.repeat(black + 0.5, 3, 0)])  # a group of 3 (at most k+1): nothing to drop
    ref = np.concatenate([np.abs(rng.normal(size=(120, 64))).astype(np.float32), np.repeat(black + 0.01, 9, 0)])
    ref = ref[rng.permutation(len(ref))]  # copies interleaved with the others
    real_exact, pairs = pr._exact, []
    monkeypatch.setattr(pr, "_exact", lambda a, i, b, j: pairs.append(len(i)) or real_exact(a, i, b, j))
    bp, br = brute_pr(ref.astype(np.float64), sample.astype(np.float64))
    d2 = ((sample[:, None, :].astype(np.float64) - sample[None, :, :]) ** 2).sum(-1)
    for block in (7, 64, 1000):
        pairs.clear()
        np.testing.assert_allclose(radii(sample, block=block), np.sort(d2, axis=1)[:, 3], rtol=1e-12)
        assert precision_recall(ref, sample, block=block) == pytest.approx((bp, br), abs=1e-12)
        assert sum(pairs) < 3000, (block, sum(pairs))  # 300 copies: 90,000 pairs of them alone
        for workers in (2, 3):
            for got in as_workers(workers, lambda comm: precision_recall(ref, sample, block=block, comm=comm)):
                assert got == pytest.approx((bp, br), abs=1e-12)


def test_near_duplicate_samples_keep_the_exact_work_small_and_the_results_exact(monkeypatch):
    """A collapsed snapshot's samples are near-duplicates, not copies: their distances (~0.2) lie within the
    float32 error bound of features of norm^2 ~180 around the origin, so every pair would go to the float64
    check (hours and hundreds of GB at 50k). Measured from the mean, the bound is small: the float64 work
    stays a sliver of n^2, and the results equal brute force's."""
    import eval.precision_recall as pr
    rng = np.random.default_rng(5)
    base = rng.gamma(1.2, 0.2, size=(1, 2048)).astype(np.float32)  # pool_3-like: non-negative, |x|^2 ~ 180
    sample = (base + rng.normal(0, 0.007, size=(400, 2048))).astype(np.float32)
    ref = (rng.gamma(1.2, 0.2, size=(300, 2048))).astype(np.float32)
    real_exact, pairs = pr._exact, []
    monkeypatch.setattr(pr, "_exact", lambda a, i, b, j: pairs.append(len(i)) or real_exact(a, i, b, j))
    d2 = ((sample[:, None, :].astype(np.float64) - sample[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(radii(sample, block=128), np.sort(d2, axis=1)[:, 3], rtol=1e-12)
    assert sum(pairs) < 0.05 * len(sample) ** 2, sum(pairs)  # all 160,000 pairs before
    assert precision_recall(ref, sample, block=128) == pytest.approx(brute_pr(ref.astype(np.float64),
                                                                             sample.astype(np.float64)), abs=1e-12)


@pytest.mark.parametrize("onednn", [True, False])
def test_distance_gemm_is_true_float32_within_the_bound(onednn, monkeypatch):
    """The float32 distances come from oneDNN's linear on a CPU (BLAS's addmm otherwise): either must keep
    float32 products (no bf16 / TF32 inputs), so that every distance lies within the error bound the float64
    check relies on; and the exact results are the same whichever GEMM ran."""
    import eval.precision_recall as pr
    monkeypatch.setattr(pr, "_onednn_float32", lambda: onednn)
    rng = np.random.default_rng(3)
    a = np.abs(rng.normal(size=(300, 2048))).astype(np.float32)
    b = (a[:200] + rng.normal(size=(200, 2048)).astype(np.float32) * 0.3).astype(np.float32)
    a[:5] = b[:5] = 1 + 3 * 2.0 ** -10  # bf16 rounds it to 1: those distances would come out 24 instead of 0
    center = torch.from_numpy(np.concatenate([a, b]).astype(np.float64).mean(0))  # one shared by both sets
    pa, pb = pr._Points(a, "cpu", center), pr._Points(b, "cpu", center)
    got = pr._approx(pa, slice(None), pb, slice(None)).double().numpy()
    want = ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
    bound = pa.err.double().numpy()[:, None] + pb.err.double().numpy()[None, :]
    assert (np.abs(got - want) <= bound).all()
    assert bound[:5, :5].max() < 2 and want[:5, :5].max() == 0
    ref, sample = near_ties()
    bp, br = brute_pr(ref.astype(np.float64), sample.astype(np.float64))
    assert precision_recall(ref, sample, block=17) == pytest.approx((bp, br), abs=1e-12)


def test_onednn_check_rejects_reduced_precision(monkeypatch):
    """The one-time check that guards the oneDNN path fails when the linear rounds its inputs to bf16."""
    import eval.precision_recall as pr
    real = torch.ops.mkldnn._linear_pointwise

    def bf16_linear(x, w, bias, *args):
        return real(x.bfloat16().float(), w.bfloat16().float(), bias, *args)

    pr._onednn_float32.cache_clear()
    try:
        assert pr._onednn_float32()  # this CPU's torch has a true float32 oneDNN linear
        pr._onednn_float32.cache_clear()
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", bf16_linear)
        assert not pr._onednn_float32()
    finally:
        monkeypatch.undo()
        pr._onednn_float32.cache_clear()


def _eigen_half_sum_scalar(values: np.ndarray) -> np.float16:
    """TensorFlow's CPU fp16 row sum, one value at a time in NumPy's float16 (a second implementation of
    eval.precision_recall._eigen_half_row_sum): split rows over 1600 values in two at a multiple of 8; in a
    leaf, four 8-lane accumulators over chunks of 32, then single packets into the first, then the other
    three into it, every add rounded to fp16; the 8 lanes summed in float32 as Eigen's predux pairs them,
    rounded; the leftover values summed in fp16 and added last."""
    h, f, n = np.float16, np.float32, len(values)
    if n > 1600:
        split = int(np.ceil(np.ceil(n / 2) / 8)) * 8
        return h(f(_eigen_half_sum_scalar(values[:split])) + f(_eigen_half_sum_scalar(values[split:])))
    acc = [[h(0)] * 8 for _ in range(4)]
    vec4, vec = n // 32 * 32, n // 8 * 8
    for j in range(0, vec4, 32):
        for q in range(4):
            for lane in range(8):
                acc[q][lane] = h(f(acc[q][lane]) + f(values[j + 8 * q + lane]))
    for j in range(vec4, vec, 8):
        for lane in range(8):
            acc[0][lane] = h(f(acc[0][lane]) + f(values[j + lane]))
    for q in (1, 2, 3):
        for lane in range(8):
            acc[0][lane] = h(f(acc[0][lane]) + f(acc[q][lane]))
    p = [f(x) for x in acc[0]]
    lanes = [f(p[i] + p[i + 4]) for i in range(4)]
    packet = h(f(f(lanes[0] + lanes[2]) + f(lanes[1] + lanes[3])))
    rest = h(0)
    for j in range(vec, n):
        rest = h(f(rest) + f(values[j]))
    return h(f(rest) + f(packet))


@pytest.mark.parametrize("dim", [2048, 2050, 256, 100, 7])
def test_fp16_row_sums_follow_tensorflows_cpu_kernel(dim):
    """The fp16 mode's row sums on a CPU, against the scalar float16 emulation above (that loop order was
    checked against TensorFlow 2.21's own output on 2048-wide rows: all 2,000 rows equal; bench/eval.py
    --adm-evaluator compares the whole result with TensorFlow's)."""
    from eval.precision_recall import _eigen_half_row_sum

    rng = np.random.default_rng(dim)
    rows = 48 if dim == 2048 else 6
    x = (np.abs(rng.normal(size=(rows, dim))) * rng.uniform(0.01, 3, size=(rows, 1))).astype(np.float16)
    squares = (x * x).astype(np.float16)
    got = _eigen_half_row_sum(torch.from_numpy(squares.astype(np.float32))).numpy().astype(np.float16)
    expected = np.array([_eigen_half_sum_scalar(row) for row in squares])
    np.testing.assert_array_equal(got, expected)
    if dim == 2048:  # the order matters: a float32 sum rounded once differs in some rows
        assert (squares.astype(np.float32).sum(1).astype(np.float16) != expected).any()


def test_fp16_distances_follow_adms_graph_in_numpy_float16():
    """distance="fp16" computes ADM's TensorFlow graph in fp16: squares rounded to fp16, row sums as
    TensorFlow's CPU kernel computes them (the scalar emulation above), the GEMM accumulated in fp32 then
    rounded, then norm_u - 2 mm + norm_v one rounded fp16 operation at a time, clamped at 0. The oracle is
    that graph in NumPy's float16."""
    from eval.precision_recall import _pairwise_fp16

    rng = np.random.default_rng(5)
    base = np.abs(rng.normal(size=(300, 16)) @ rng.normal(size=(16, 256))).astype(np.float32) / 20
    u, v = base[:120], base[120:]
    h, f = np.float16, np.float32
    u16, v16 = u.astype(h), v.astype(h)
    nu = np.array([_eigen_half_sum_scalar(row) for row in (u16 * u16)])[:, None]
    nv = np.array([_eigen_half_sum_scalar(row) for row in (v16 * v16)])[None, :]
    mm = (u16.astype(f) @ v16.astype(f).T).astype(h)
    expected = np.maximum((nu - h(2) * mm) + nv, h(0)).astype(np.float64)
    assert nu.dtype == mm.dtype == h and np.isfinite(expected).all()
    got = _pairwise_fp16(torch.from_numpy(u), torch.from_numpy(v), "cpu").numpy()
    assert (got == expected).mean() > 0.99
    # fp32 accumulation order (torch's GEMM vs NumPy's, which differs between CPUs) may move a GEMM entry
    # across an fp16 rounding boundary. Any order's fp32 sum of n terms lies within n * 2^-24 * sum|terms| of
    # the exact (float64) sum; the graph is monotone in each entry, so every order's result lies between the
    # graph run on the fp16 roundings of those bounds.
    u64, v64 = u16.astype(np.float64), v16.astype(np.float64)
    n, unit = u.shape[1], 2.0 ** -24
    exact = u64 @ v64.T
    mm_lo, mm_hi = (exact - n * unit * (np.abs(u64) @ np.abs(v64).T)).astype(h), \
        (exact + n * unit * (np.abs(u64) @ np.abs(v64).T)).astype(h)
    low = np.maximum((nu - h(2) * mm_hi) + nv, h(0)).astype(np.float64)
    high = np.maximum((nu - h(2) * mm_lo) + nv, h(0)).astype(np.float64)
    assert (low <= expected).all() and (expected <= high).all()  # the bounds hold NumPy's order too
    assert (low <= got).all() and (got <= high).all()
    assert ((high - low) <= 8 * np.spacing(expected.astype(h))).all()  # and are tight: a few fp16 ulps


def test_stored_shape_reads_npy_headers_of_either_version(tmp_path):
    """A reference's array shapes come from the .npy headers inside the npz (version 1.0 as np.savez writes
    them, 2.0 as numpy writes very long headers), equal to the shapes of the arrays numpy reads back."""
    import zipfile

    from eval.metrics import stored_shape

    path = tmp_path / "ref.npz"
    arrays = {"a": np.zeros((3, 5, 7), np.uint8), "b": np.ones((4, 2048), np.float32), "c": np.array(7)}
    with zipfile.ZipFile(path, "w") as z:
        for (name, arr), version in zip(arrays.items(), [(1, 0), (2, 0), (2, 0)]):
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, arr, version=version)
    with np.load(path) as data:
        for name, arr in arrays.items():
            assert stored_shape(data, name) == arr.shape == data[name].shape


def test_a_device_this_machine_lacks_is_one_line_before_any_file_is_read(tmp_path):
    """--device is checked before the files are opened: a typo or a GPU that is not there is named, not
    torch's error half-way through the features."""
    bad = run_cli("eval", "compare", str(tmp_path / "none.npz"), str(tmp_path / "none.npz"), "--device", "cuda:x",
                  check=False)
    assert bad.returncode == 2 and "--device cuda:x: not a torch device" in bad.stderr, bad.stderr
    if not torch.cuda.is_available():
        bad = run_cli("eval", "ref", str(tmp_path), "--out", str(tmp_path / "r.npz"), "--resolution", "32",
                      "--device", "cuda", check=False)
        assert bad.returncode == 2 and "--device cuda: torch sees no CUDA GPU here; use --device cpu" in bad.stderr
