"""The evaluation farm on this machine: reference batches from shards, feature workers, the exact
reducer at 1-3 workers (MPI and torch.distributed), the registry and scheduler (exactly once, with
racing schedulers and a killed evaluation), Inception Score, reports."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, randomize_, run_cli
from models.config import build_model
from models.presets import get_preset
from models.snapshot import save_snapshot

SETTING = ["--name", "fast", "--steps", "ddim2", "--num", "6", "--shard-size", "4", "--batch-size", "4"]


def make_run(root, kimgs=(1, 2, 3)):
    """A run directory with snapshots of increasingly trained-looking (here: differently seeded) tiny models."""
    preset = get_preset("tiny-32")
    cfg = preset.config()
    for i, k in enumerate(kimgs):
        model = randomize_(build_model(cfg), seed=10 + i, scale=0.05)
        save_snapshot(root / "snapshots" / f"img{k * 1000:012d}", model.state_dict(), cfg,
                      meta={"task": "diffusion", "images": k * 1000, "diffusion": preset.diffusion})
    (root / "training_options.json").write_text(json.dumps({"task": "diffusion", "model": preset.model}))
    return root


@pytest.fixture(scope="module")
def reference(digit_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    proc = run_cli("eval", "ref", str(digit_shards / "val"), "--out", str(out), "--resolution", "32",
                   "--pr-num", "20")
    assert "statistics of 30 images" in proc.stdout
    return out


def test_reference_batch_from_shards(reference, digit_shards):
    from data_pipeline.loader import StreamLoader
    from eval.inception import extract

    ref = np.load(reference)
    meta = json.loads(str(ref["meta"]))
    assert meta["resolution"] == 32 and meta["num_images"] == 30 and meta["num_pr"] == 20
    assert ref["arr_0"].shape == (20, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
    # an independent pass: every image of the split read by the loader, features of all of them at once
    batch = next(iter(StreamLoader(digit_shards / "val", 32, 30, flip=False, num_slots=1)))
    images = ((batch["image"] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    feats = extract(images, batch_size=30, device="cpu")
    np.testing.assert_allclose(ref["mu"], feats["pool"].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats["pool"].astype(np.float64), rowvar=False), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(ref["mu_s"], feats["spatial"].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ref["arr_0"], images[:20])  # the subset: the first images of the order
    np.testing.assert_allclose(ref["pool"], feats["pool"][:20], rtol=1e-5, atol=1e-5)  # the subset's features


def test_a_reference_with_its_own_features_is_not_featurized_again(reference, tmp_path, monkeypatch):
    """`adm eval ref` stores arr_0's pool_3 features (tagged with the network's SHA-1): loading uses them
    without running Inception. Without the tag (another network, or a file edited by hand) or without
    the features (ADM's own reference batches), they are computed from arr_0, as before."""
    import eval.metrics as metrics

    ref = dict(np.load(reference))
    meta = json.loads(str(ref["meta"]))
    calls = []
    real_extract = metrics.extract
    monkeypatch.setattr(metrics, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    read = []
    real_getitem = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, k: read.append(k) or real_getitem(self, k))
    loaded = metrics.load_reference(reference)
    assert calls == [] and loaded["resolution"] == 32
    assert "arr_0" not in read  # its shape comes from the .npy header: the images are not read at all
    with np.load(reference) as data:
        assert metrics.stored_shape(data, "arr_0") == ref["arr_0"].shape
        assert metrics.stored_shape(data, "pool") == ref["pool"].shape
        assert metrics.stored_shape(data, "meta") == ()
    np.testing.assert_array_equal(loaded["pool"], ref["pool"])
    np.testing.assert_array_equal(loaded["sigma"], ref["sigma"])  # the whole split's statistics, not arr_0's
    for name, changed in (("other-net", dict(meta=np.array(json.dumps({**meta, "pool_features": "0" * 40})))),
                          ("adm-format", {})):
        path = tmp_path / f"{name}.npz"
        np.savez(path, **{**{k: v for k, v in ref.items() if name != "adm-format" or k not in ("pool", "meta")},
                          **changed})
        again = metrics.load_reference(path)
        np.testing.assert_allclose(again["pool"], ref["pool"], rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


@pytest.fixture(scope="module")
def evaluated(reference, tmp_path_factory):
    """Three snapshots evaluated by the scheduler: one scheduler killed mid-evaluation, then two started
    at the same instant."""
    run = make_run(tmp_path_factory.mktemp("farm") / "run")
    cmd = [sys.executable, "-m", "adm", "eval", "schedule", str(run), "--ref", str(reference), "--once",
           "--cluster", "local", *SETTING]
    victim = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed_key = time.time() + 120, None
    while time.time() < deadline and killed_key is None:
        for claim in (run / "eval").glob("*/attempt-1.json"):
            if not (claim.parent / "metrics.json").exists():
                killed_key = claim.parent.name
        time.sleep(0.02)
    assert killed_key, "the first scheduler never claimed an evaluation"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    racers = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outs = [r.communicate(timeout=900) for r in racers]
    for r, (out, err) in zip(racers, outs):
        assert r.returncode == 0, out + err
    return run, killed_key, outs


def test_scheduler_evaluates_each_snapshot_exactly_once(evaluated):
    run, killed_key, outs = evaluated
    keys = sorted(p.name for p in (run / "eval").iterdir() if p.name != "ref-cache")
    assert len(keys) == 3
    for key in keys:
        attempts = sorted(p.name for p in (run / "eval" / key).glob("attempt-*.json"))
        assert (run / "eval" / key / "metrics.json").is_file()
        # the killed evaluation was retried once (attempt 2); the others ran once
        assert attempts == (["attempt-1.json", "attempt-2.json"] if key == killed_key else ["attempt-1.json"])
        # published exactly once: one TensorBoard events file per evaluation
        assert len(list((run / "tensorboard").glob(f"*.eval-{key}"))) == 1
    log = "".join(o for o, _ in outs)
    assert f"{killed_key}: attempt 1 did not finish" in log
    results = json.loads(run_cli("eval", "results", str(run), "--json", str(run / "r.json")).stdout and
                         (run / "r.json").read_text())
    assert sorted(r["images"] for r in results) == [1000, 2000, 3000]
    for r in results:
        assert r["metrics"]["num_samples"] == 6 and set(r["metrics"]) >= {"fid", "sfid", "precision", "recall"}


def test_farm_result_equals_a_single_process_evaluation(evaluated, reference):
    """The farm (shards, per-shard statistics, merge) gives ADM's evaluator's numbers on the merged file."""
    run, _, _ = evaluated
    from eval.compare import compare

    for key_dir in sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file()):
        got = json.loads((key_dir / "metrics.json").read_text())["metrics"]
        shards = sorted((key_dir / "samples").glob("samples-*.npz"))
        merged = key_dir.parent.parent / f"merged-{key_dir.name}.npz"
        np.savez(merged, arr_0=np.concatenate([np.load(s)["arr_0"] for s in shards]))
        want = compare(str(reference), str(merged))
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-6)
        assert got["sfid"] == pytest.approx(want["sfid"], rel=1e-6)
        assert (got["precision"], got["recall"]) == (want["precision"], want["recall"])
    # the farm took the reference's covariance roots from its cache, computed once: roots of those covariances
    from eval.metrics import load_reference

    [cached] = (run / "eval" / "ref-cache").glob("*-sqrt.npz")
    roots, ref = np.load(cached), load_reference(reference)
    for k in ("sigma", "sigma_s"):
        np.testing.assert_allclose(roots[f"sqrt_{k}"] @ roots[f"sqrt_{k}"], ref[k], rtol=0,
                                   atol=1e-9 * np.abs(ref[k]).max())


def test_a_published_evaluation_keeps_one_merged_features_file(evaluated):
    """The per-shard float64 sums of outer products go once the metrics are out; what is left (all pool
    features and the merged statistics) still gives the published numbers."""
    from eval.stats import Statistics

    run, _, _ = evaluated
    for key_dir in sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file()):
        assert sorted(p.name for p in (key_dir / "features").iterdir()) == ["features-merged.npz"]
        d = np.load(key_dir / "features" / "features-merged.npz")
        pool = d["pool"].astype(np.float64)
        assert pool.shape == (6, 2048) and d["labels"].shape == (6,)
        stats = Statistics.from_npz({k[5:]: d[k] for k in d.files if k.startswith("pool_")})
        np.testing.assert_allclose(stats.mu, pool.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats.sigma, np.cov(pool, rowvar=False), rtol=1e-8, atol=1e-10)
        spec = json.loads((key_dir / "setting.json").read_text())
        out = key_dir / "again.json"
        run_cli("eval", "metrics", str(key_dir / "features"), "--ref", spec["ref"], "--json", str(out))
        published = json.loads((key_dir / "metrics.json").read_text())["metrics"]
        again = json.loads(out.read_text())
        for k in ("fid", "sfid", "precision", "recall"):
            assert again[k] == pytest.approx(published[k], rel=1e-12, abs=1e-12), k


def test_tensorboard_and_report(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = evaluated
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    fid = acc.Scalars("eval/fast/fid")
    assert sorted(e.step for e in fid) == [1000, 2000, 3000]
    run_cli("report", str(run))
    html = (run / "report.html").read_text()
    for k in (1, 2, 3):
        assert f"img{k * 1000:012d}" in html
    assert "Progressive decoding" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html  # opens offline
    md = (run / "report.md").read_text()
    assert md.count("| fast |") == 3
    assert len(json.loads((run / "report.json").read_text())["rows"]) == 3


def test_report_escapes_every_value(tmp_path):
    from eval.report import write_report

    run = tmp_path / "run"
    (run / "eval" / "k").mkdir(parents=True)
    (run / "eval" / "k" / "failed.json").write_text(json.dumps(
        {"key": "k", "snapshot": "s", "snapshot_name": "<script>alert(1)</script>", "images": 0,
         "setting": {"name": "x"}, "attempts": 3, "last_error": "<b>boom</b>"}))
    html = write_report(run).read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;boom&lt;/b&gt;" in html


def _metrics(evaluated, launcher):
    run, _, _ = evaluated
    key_dir = sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file())[0]
    spec = json.loads((key_dir / "setting.json").read_text())
    out = key_dir / f"m-{abs(hash(tuple(launcher)))}.json"
    cmd = [*(launcher or [sys.executable]), "-m", "eval", "metrics", str(key_dir / "features"), "--ref", spec["ref"],
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_reducer_is_identical_at_1_2_and_3_workers(evaluated):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    one = _metrics(evaluated, [])
    assert one["workers"] == 1
    results = [_metrics(evaluated, [mpiexec, "-n", str(n), sys.executable]) for n in (2, 3)]
    results.append(_metrics(evaluated, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]))
    assert [r["workers"] for r in results] == [2, 3, 2]
    for r in results:
        assert {k: r[k] for k in ("fid", "sfid", "precision", "recall")} == \
               {k: one[k] for k in ("fid", "sfid", "precision", "recall")}


def test_inception_score_matches_torch_fidelity_and_reads_its_weights_file(evaluated, tmp_path):
    from torch_fidelity.metric_isc import isc_features_to_metric

    from eval.inception import logits_weight
    from eval.metrics import inception_score

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(300, 1008)) * 3
    # ADM's splits are consecutive runs of split_size samples in order; torch-fidelity's, N // splits
    ours = inception_score(logits, split_size=100)
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=3, shuffle=False)["inception_score_mean"]
    assert ours == pytest.approx(theirs, rel=1e-10)
    uniform = inception_score(np.zeros((10, 1008)))
    assert uniform == pytest.approx(1.0)
    # torch-fidelity's weights file format: a state dict whose fc.weight gives the unbiased logits
    w = torch.from_numpy(rng.normal(size=(1008, 2048)).astype(np.float32) * 0.01)
    torch.save({"fc.weight": w, "fc.bias": torch.zeros(1008)}, tmp_path / "weights.pth")
    np.testing.assert_array_equal(logits_weight(tmp_path / "weights.pth"), w.double().numpy())
    run, _, _ = evaluated
    key_dir = sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file())[0]
    spec = json.loads((key_dir / "setting.json").read_text())
    out = run_cli("eval", "metrics", str(key_dir / "features"), "--ref", spec["ref"], "--inception-weights",
                  str(tmp_path / "weights.pth")).stdout
    pool = np.concatenate([np.load(p)["pool"] for p in sorted((key_dir / "features").glob("features-*.npz"))])
    expected = inception_score(pool.astype(np.float64) @ w.double().numpy().T)
    assert f"inception_score: {expected:.6f}" in out
    torch.save({"something": torch.zeros(3)}, tmp_path / "bad.pth")
    bad = run_cli("eval", "metrics", str(key_dir / "features"), "--ref", spec["ref"], "--inception-weights",
                  str(tmp_path / "bad.pth"), check=False)
    assert bad.returncode == 2 and "fc.weight" in bad.stderr


def test_failed_evaluations_are_retried_then_reported(reference, tmp_path):
    """A setting that cannot run (its classifier snapshot is a diffusion model) fails every attempt;
    after --max-attempts the registry says so and the report shows it."""
    run = make_run(tmp_path / "run", kimgs=(1,))
    wrong = str(next((run / "snapshots").iterdir()))
    args = ["eval", "schedule", str(run), "--ref", str(reference), "--once", "--cluster", "local", *SETTING,
            "--scale", "1", "--classifier", wrong, "--max-attempts", "2"]
    for _ in range(3):
        run_cli(*args, check=False)
    key_dir = next(p for p in (run / "eval").iterdir() if p.name != "ref-cache")
    assert sorted(p.name for p in key_dir.glob("attempt-*.json")) == ["attempt-1.json", "attempt-2.json"]
    failed = json.loads((key_dir / "failed.json").read_text())
    assert failed["attempts"] == 2 and "expected a classifier" in failed["last_error"]
    assert "FAILED" in run_cli("eval", "results", str(run)).stdout
    assert "expected a classifier" in (run / "report.html").read_text()


def test_bad_input_is_named(reference, tmp_path):
    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = str(next((run / "snapshots").iterdir()))
    cases = [
        (["eval", "run", snap, "--ref", str(tmp_path / "nope.npz")], "nope.npz: no such file"),
        (["eval", "run", snap, "--ref", str(reference), "--num", "1"], "num must be >= 2"),
        (["eval", "run", snap, "--ref", str(reference), "--scale", "2"], "needs a classifier"),
        (["eval", "schedule", str(tmp_path), "--ref", str(reference)], "no snapshots/"),
        (["eval", "schedule", str(run), "--ref", str(reference), "--every", "soon"], "--every 'soon'"),
    ]
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "nokeys.npz", x=np.zeros(3))
    np.savez(tmp_path / "img64.npz", arr_0=np.zeros((4, 64, 64, 3), np.uint8))
    (tmp_path / "settings.yaml").write_text("- name: a\n  stepz: ddim2\n")
    cases += [
        (["eval", "compare", str(reference), str(tmp_path / "float.npz")], "float.npz: arr_0 must be uint8"),
        (["eval", "compare", str(reference), str(tmp_path / "nokeys.npz")], "nokeys.npz: expected arr_0"),
        (["eval", "compare", str(reference), str(tmp_path / "img64.npz")], "compare at the same resolution"),
        (["eval", "run", snap, "--ref", str(reference), "--settings", str(tmp_path / "settings.yaml")],
         "unknown key(s) ['stepz']"),
    ]
    for args, message in cases:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_shipped_settings_files_load():
    from eval.settings import load_settings

    for path in sorted((REPO / "configs" / "eval").glob("*.yaml")):
        settings = load_settings(path)
        assert settings and all(s.num >= 2 for s in settings), path
