"""Released-layout checkpoints load strictly, convert to snapshots and back, and give identical outputs."""

import json
import re

import pytest
import torch

from conftest import randomize_, run_cli
from models.config import build_model
from models.presets import get_preset
from models.snapshot import CONFIG, MANIFEST, WEIGHTS, SnapshotError, load_snapshot, save_snapshot

gd_unet = pytest.importorskip("guided_diffusion.unet", reason="scripts/setup.sh installs guided-diffusion-sdk")
gd_script = pytest.importorskip("guided_diffusion.script_util")


def reference_tiny_32():
    """guided-diffusion's own UNet with the tiny-32 preset's architecture, random weights."""
    ref = gd_unet.UNetModel(image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                            attention_resolutions=(4,), channel_mult=(1, 2, 2), num_classes=10,
                            num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True)
    return randomize_(ref, seed=7).eval()


@pytest.fixture
def released_pt(tmp_path):
    ref = reference_tiny_32()
    path = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_pt_to_snapshot_and_back(tmp_path, released_pt):
    ref, pt = released_pt
    snap_dir = tmp_path / "snap"
    out = run_cli("models", "convert", str(pt), str(snap_dir))
    assert "as tiny-32" in out.stdout  # preset inferred from the layout
    manifest = json.loads((snap_dir / MANIFEST).read_text())
    assert set(manifest["files"]) == {WEIGHTS, "config.json"}
    config = json.loads((snap_dir / "config.json").read_text())
    assert config["preset"] == "tiny-32" and config["model"]["num_classes"] == 10

    snap = load_snapshot(snap_dir, hashes=True)
    model = snap.build()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref(x, t, y), rtol=1e-5, atol=1e-6)

    back = tmp_path / "back.pt"
    run_cli("models", "convert", str(snap_dir), str(back))
    reloaded = torch.load(back, weights_only=True)
    original = ref.state_dict()
    assert list(reloaded) == list(original)
    assert all(torch.equal(reloaded[k], original[k]) for k in original)
    fresh = build_model(get_preset("tiny-32").config())
    fresh.load_state_dict(reloaded, strict=True)
    for src, dst in ((snap_dir, back), (pt, snap_dir)):  # an existing destination: the same rule both ways
        before = sorted((p.name, p.stat().st_mtime_ns) for p in [dst, *dst.rglob("*")])
        proc = run_cli("models", "convert", str(src), str(dst), check=False)
        assert proc.returncode == 2 and f"{dst} already exists (pass --overwrite to replace it)" in proc.stderr
        assert sorted((p.name, p.stat().st_mtime_ns) for p in [dst, *dst.rglob("*")]) == before
        run_cli("models", "convert", str(src), str(dst), "--overwrite")
    assert all(torch.equal(torch.load(back, weights_only=True)[k], original[k]) for k in original)


def test_published_classifier_layout_converts_with_inferred_preset(tmp_path):
    flags = dict(gd_script.classifier_defaults(), image_size=128)
    ref = gd_script.create_classifier(**flags)
    pt = tmp_path / "128x128_classifier.pt"
    torch.save(ref.state_dict(), pt)
    out = run_cli("models", "convert", str(pt), str(tmp_path / "snap"))
    assert "as classifier-128" in out.stdout
    model = load_snapshot(tmp_path / "snap").build()
    x, t = torch.randn(1, 3, 128, 128), torch.tensor([10])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref.eval()(x, t), rtol=1e-5, atol=1e-5)


def test_other_class_counts_convert_as_their_preset(tmp_path):
    """A preset's architecture trained on data with another class count (guided-diffusion's own UNet and
    classifier, 7 classes): the class count is read off the shapes, and the converted model gives the
    reference's outputs."""
    ref = gd_unet.UNetModel(image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                            attention_resolutions=(4,), channel_mult=(1, 2, 2), num_classes=7,
                            num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True)
    clf = gd_script.create_classifier(**dict(gd_script.classifier_defaults(), image_size=128))
    clf.out[2].c_proj = torch.nn.Conv1d(clf.out[2].c_proj.in_channels, 7, 1)  # a 7-way head
    for model, preset, size, kwargs in ((randomize_(ref, seed=3).eval(), "tiny-32", 32, {"y": torch.tensor([6])}),
                                        (clf.eval(), "classifier-128", 128, {})):
        pt = tmp_path / f"{preset}.pt"
        torch.save(model.state_dict(), pt)
        out = run_cli("models", "convert", str(pt), str(tmp_path / preset))
        assert f"as {preset}" in out.stdout and "with 7 classes" in out.stdout
        snap = load_snapshot(tmp_path / preset)
        assert snap.config.num_classes == 7
        x, t = torch.randn(1, 3, size, size), torch.tensor([10])
        with torch.no_grad():
            torch.testing.assert_close(snap.build()(x, t, **kwargs), model(x, t, **kwargs), rtol=1e-5, atol=1e-5)


def test_mismatched_checkpoint_lists_keys_and_suggests(tmp_path, released_pt):
    ref, _ = released_pt
    sd = ref.state_dict()
    del sd["out.2.bias"]
    sd["label_emb.weight"] = torch.zeros(1000, 128)
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    proc = run_cli("models", "convert", str(bad), str(tmp_path / "s"), "--preset", "tiny-32", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing keys (1): out.2.bias" in proc.stderr
    assert "unexpected keys (1): extra.weight" in proc.stderr
    assert "label_emb.weight (checkpoint [1000, 128], model [10, 128])" in proc.stderr
    assert "closest presets: tiny-32" in proc.stderr
    assert not (tmp_path / "s").exists()

    good = tmp_path / "good.pt"
    torch.save(ref.state_dict(), good)
    proc = run_cli("models", "convert", str(good), str(tmp_path / "s"), "--preset", "tiny-upsampler-32-64", check=False)
    assert proc.returncode == 2 and "exactly the layout of preset tiny-32" in proc.stderr


def test_conversion_options_and_what_it_records(tmp_path, released_pt):
    """Overrides apply wherever they stand (and unknown keys are refused); a checkpoint that fits no preset
    is told how it differs from the closest; a YAML config's diffusion section is what the snapshot
    records (without one, ADM's linear 1000 steps, said out loud); same-layout presets are named."""
    ref, pt = released_pt
    out = run_cli("models", "convert", str(pt), str(tmp_path / "a"), "dropout=0.3")  # inferred, then overridden
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model"]["dropout"] == 0.3
    run_cli("models", "convert", str(pt), str(tmp_path / "b"), "--preset", "tiny-32", "dropout=0.2")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model"]["dropout"] == 0.2
    proc = run_cli("models", "convert", str(pt), str(tmp_path / "c"), "foo=1", check=False)
    assert proc.returncode == 2 and "foo" in proc.stderr and not (tmp_path / "c").exists()
    proc = run_cli("models", "convert", str(pt), str(tmp_path / "c"), "--preset", "tiny-32", "num_res_blocks=2",
                   check=False)
    assert proc.returncode == 2 and "does not fit tiny-32 with num_res_blocks=2" in proc.stderr
    sd = ref.state_dict()
    del sd["out.2.bias"]
    torch.save(sd, tmp_path / "cut.pt")
    proc = run_cli("models", "convert", str(tmp_path / "cut.pt"), str(tmp_path / "c"), check=False)
    assert proc.returncode == 2 and "matches no preset exactly (closest: tiny-32 (99." in proc.stderr, proc.stderr
    assert "against tiny-32: missing keys (1): out.2.bias" in proc.stderr
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())["model"]  # (JSON is YAML)
    (tmp_path / "m.yaml").write_text(json.dumps({"model": cfg, "diffusion": {"noise_schedule": "cosine", "steps": 4000}}))
    run_cli("models", "convert", str(pt), str(tmp_path / "d"), "--config", str(tmp_path / "m.yaml"))
    assert json.loads((tmp_path / "d" / "config.json").read_text())["diffusion"] == {
        "steps": 4000, "noise_schedule": "cosine", "predict_xstart": False}
    (tmp_path / "n.yaml").write_text(json.dumps({"model": cfg}))
    out = run_cli("models", "convert", str(pt), str(tmp_path / "e"), "--config", str(tmp_path / "n.yaml")).stdout
    assert (f"recorded ADM's diffusion, {{'steps': 1000, 'noise_schedule': 'linear'}} (add a diffusion: section to "
            f"{tmp_path / 'n.yaml'} to say otherwise)") in out
    # --preset takes a YAML file too: its diffusion section counts as --config's does (it was dropped, silently)
    run_cli("models", "convert", str(pt), str(tmp_path / "g"), "--preset", str(tmp_path / "m.yaml"))
    assert json.loads((tmp_path / "g" / "config.json").read_text())["diffusion"] == {
        "steps": 4000, "noise_schedule": "cosine", "predict_xstart": False}
    (tmp_path / "x.yaml").write_text(json.dumps({"model": cfg, "diffusion": {"noise_schedule": "sigmoid"}}))
    proc = run_cli("models", "convert", str(pt), str(tmp_path / "f"), "--config", str(tmp_path / "x.yaml"), check=False)
    assert proc.returncode == 2 and "noise_schedule linear or cosine" in proc.stderr
    from models.cli import same_layout

    assert same_layout("adm-256-uncond") == ["adm-256-uncond", "adm-lsun"] and same_layout("tiny-32") == ["tiny-32"]


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    proc = run_cli("models", "convert", str(junk), str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and "not a loadable PyTorch checkpoint" in proc.stderr
    proc = run_cli("models", "convert", str(tmp_path / "nope.pt"), str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr
    import pickle

    with open(tmp_path / "objects.pt", "wb") as f:  # a pickle of objects: torch's weights-only loader refuses it
        pickle.dump({"w": object()}, f)
    proc = run_cli("models", "convert", str(tmp_path / "objects.pt"), str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and "unpickling failed: not a PyTorch file of tensors" in proc.stderr
    assert "weights_only" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1  # no unsafe advice
    state = tmp_path / "rank00000.pt"  # a training-state file: tensors nested under "ema", "gen", ...
    torch.save({"ema": {0.9999: [torch.zeros(2)]}, "gen": torch.zeros(3, dtype=torch.uint8)}, state)
    proc = run_cli("models", "convert", str(state), str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and "got a dict whose 'ema' is a dict (training state?" in proc.stderr


def test_incomplete_or_corrupt_snapshots_are_refused(tmp_path):
    cfg = get_preset("tiny-classifier-32").config()
    model = build_model(cfg)
    snap = save_snapshot(tmp_path / "snap", model.state_dict(), cfg)
    assert load_snapshot(snap).config == cfg
    with pytest.raises(SnapshotError, match="already exists"):
        save_snapshot(snap, model.state_dict(), cfg)
    # no stray temporary directories are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]

    weights = snap / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(SnapshotError, match="truncated"):
        load_snapshot(snap)
    weights.write_bytes(data[:-4] + bytes(4))
    with pytest.raises(SnapshotError, match="corrupt"):
        load_snapshot(snap, hashes=True)
    (snap / MANIFEST).unlink()
    with pytest.raises(SnapshotError, match="not a complete snapshot"):
        load_snapshot(snap)


def _rewrite(snap, name, payload: bytes) -> None:
    """Replace one file of a snapshot and record it in its manifest, as a consistent but bad snapshot."""
    import hashlib

    (snap / name).write_bytes(payload)
    manifest = json.loads((snap / MANIFEST).read_text())
    manifest["files"][name] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (snap / MANIFEST).write_text(json.dumps(manifest))


def test_snapshots_whose_files_check_out_but_cannot_sample_are_refused_by_name(tmp_path):
    """Manifest-consistent snapshots with an unreadable weights file, NaN weights, a config that is not
    JSON, of a newer version, or with a wrongly typed or impossible model field: each refused naming the file
    and what is wrong, before anything is built or sampled."""
    import json

    from safetensors.torch import save_file

    cfg = get_preset("tiny-classifier-32").config()
    state = build_model(cfg).state_dict()
    good = save_snapshot(tmp_path / "good", state, cfg)
    config = json.loads((good / CONFIG).read_text())
    nan = {k: v.clone() for k, v in state.items()}
    first = next(k for k, v in nan.items() if v.is_floating_point())
    nan[first].view(-1)[0] = float("nan")
    save_file({k: v.contiguous() for k, v in nan.items()}, str(tmp_path / "nan.safetensors"))
    cases = [
        (WEIGHTS, (good / WEIGHTS).read_bytes()[:-2000], "model.safetensors: not a readable safetensors file"),
        (WEIGHTS, (tmp_path / "nan.safetensors").read_bytes(),
         f"model.safetensors: 1 tensor(s) hold NaN or infinite values ({first})"),
        (CONFIG, b'{"format": "adm-snap', "config.json: not valid JSON"),
        (CONFIG, json.dumps({**config, "version": 99}).encode(), "config.json: snapshot version 99; this tool reads"),
        (CONFIG, json.dumps({**config, "model": {**config["model"], "model_channels": "32"}}).encode(),
         "config.json: bad model section: model.model_channels: expected int, got '32'"),
        (CONFIG, json.dumps({**config, "model": {**config["model"], "model_channels": 0}}).encode(),
         "model.model_channels: must be at least 1, got 0"),
    ]
    for i, (name, payload, expected) in enumerate(cases):
        snap = save_snapshot(tmp_path / f"s{i}", state, cfg)
        _rewrite(snap, name, payload)
        with pytest.raises(SnapshotError, match=re.escape(expected)):
            load_snapshot(snap, hashes=True)
        proc = run_cli("models", "convert", str(snap), str(tmp_path / f"back{i}.pt"), check=False)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_overwrite_replaces_atomically(tmp_path):
    cfg = get_preset("tiny-classifier-32").config()
    a, b = randomize_(build_model(cfg), seed=1), randomize_(build_model(cfg), seed=2)
    save_snapshot(tmp_path / "s", a.state_dict(), cfg)
    save_snapshot(tmp_path / "s", b.state_dict(), cfg, overwrite=True)
    loaded = load_snapshot(tmp_path / "s", hashes=True).state_dict
    assert all(torch.equal(loaded[k], v) for k, v in b.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_snapshots_get_the_modes_of_the_users_umask(tmp_path, umask):
    """A snapshot is built in a mkdtemp directory (0700) with safetensors files (0600); once committed it
    has the modes a plain mkdir/open would give, so eval jobs running as another user can read it."""
    import os
    import stat

    cfg = get_preset("tiny-classifier-32").config()
    old = os.umask(umask)
    try:
        snap = save_snapshot(tmp_path / "snap", build_model(cfg).state_dict(), cfg,
                             extra_weights={"raw": build_model(cfg).state_dict()})
    finally:
        os.umask(old)
    assert stat.S_IMODE(snap.stat().st_mode) == 0o777 & ~umask
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in snap.iterdir()} == {
        name: 0o666 & ~umask for name in ("model.safetensors", "raw.safetensors", "config.json", "manifest.json")}


def test_what_convert_refuses_to_write_over_or_to_write(tmp_path, released_pt):
    """--overwrite replaces a snapshot or a file it wrote, never a folder of other files (one holding the
    source: it was deleted whole before); a snapshot converts to a file path, not into a directory, and a
    failed write leaves no partial file; weights that are NaN or integers are refused before writing."""
    ref, pt = released_pt
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "notes.txt").write_text("precious")
    src = folder / "tiny.pt"
    src.write_bytes(pt.read_bytes())
    for dst, message in [(folder, f"{folder}: holds the source {src}"),
                         (folder / "sub", f"{folder / 'sub'} exists and is not a snapshot (it holds notes.txt); "
                                          "not replaced")]:
        proc = run_cli("models", "convert", str(src), str(dst), "--overwrite", check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert src.read_bytes() == pt.read_bytes() and (folder / "sub" / "notes.txt").read_text() == "precious"
    snap = tmp_path / "snap"
    run_cli("models", "convert", str(pt), str(snap))
    run_cli("models", "convert", str(pt), str(snap), "--overwrite")  # a snapshot is replaced
    proc = run_cli("models", "convert", str(snap), str(folder), "--overwrite", check=False)
    assert proc.returncode == 2 and f"{folder}: a directory; a snapshot converts to a .pt file" in proc.stderr
    # a .pt written into the snapshot itself made it no snapshot (a later convert --overwrite into it refused)
    proc = run_cli("models", "convert", str(snap), str(snap / "back.pt"), check=False)
    assert proc.returncode == 2 and f"{snap / 'back.pt'}: inside the snapshot {snap}" in proc.stderr
    assert not (snap / "back.pt").exists()
    # a released .pt given where a snapshot goes is told how to convert it (it was "does not exist")
    proc = run_cli("sample", str(pt), "--num", "1", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and (f"{pt}: a file, not a snapshot directory; convert a released checkpoint "
                                     f"first: adm models convert {pt} DIR") in proc.stderr, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["sub", "tiny.pt"]  # no .partial left
    sd = ref.state_dict()
    for name, change, message in [("nan.pt", lambda d: d["out.2.bias"].view(-1)[0].fill_(float("nan")),
                                   "1 tensor(s) hold NaN or infinite values (out.2.bias)"),
                                  ("int.pt", lambda d: d.update({"out.2.bias": d["out.2.bias"].long()}),
                                   "1 tensor(s) are not floating-point (out.2.bias is torch.int64)")]:
        bad = {k: v.clone() for k, v in sd.items()}
        change(bad)
        torch.save(bad, tmp_path / name)
        proc = run_cli("models", "convert", str(tmp_path / name), str(tmp_path / "s"), check=False)
        assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "s").exists(), proc.stderr


def test_wrapped_and_ddp_prefixed_checkpoints_convert_to_the_same_snapshot(tmp_path, released_pt):
    """A training script's {"model": state dict} and DistributedDataParallel's `module.` keys are unwrapped
    (and said); the snapshot equals the plain file's. A key that is not a name is refused by name. A --config
    file is read for its diffusion section whatever its suffix, as it is for the architecture."""
    ref, pt = released_pt
    run_cli("models", "convert", str(pt), str(tmp_path / "plain"))
    sd = ref.state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "step": 7}, tmp_path / "wrapped.pt")
    out = run_cli("models", "convert", str(tmp_path / "wrapped.pt"), str(tmp_path / "w")).stdout
    assert "converting its 'model' entry (the file holds 'model', 'step')" in out and "prefix dropped" in out
    plain, wrapped = load_snapshot(tmp_path / "plain").state_dict, load_snapshot(tmp_path / "w").state_dict
    assert plain.keys() == wrapped.keys() and all(torch.equal(plain[k], wrapped[k]) for k in plain)
    # raw and EMA weights in one file (DiT's and EDM's saves): the EMA is converted (what evaluations use; the raw
    # weights were), and --entry picks the other; an entry that is not there is named
    raw = {k: v + 1 for k, v in sd.items()}
    torch.save({"model": raw, "ema": sd, "opt": {"step": 3}}, tmp_path / "both.pt")
    out = run_cli("models", "convert", str(tmp_path / "both.pt"), str(tmp_path / "e")).stdout
    assert "converting its 'ema' entry (the file holds 'model', 'ema', 'opt'); --entry model converts that" in out
    ema = load_snapshot(tmp_path / "e").state_dict
    assert all(torch.equal(plain[k], ema[k]) for k in plain)
    run_cli("models", "convert", str(tmp_path / "both.pt"), str(tmp_path / "r"), "--entry", "model")
    assert all(torch.equal(raw[k], load_snapshot(tmp_path / "r").state_dict[k]) for k in raw)
    proc = run_cli("models", "convert", str(tmp_path / "both.pt"), str(tmp_path / "x"), "--entry", "opt", check=False)
    assert proc.returncode == 2 and "--entry opt: " in proc.stderr and "has no state dict under that name (it holds " \
        "'model', 'ema', 'opt')" in proc.stderr
    torch.save({0: torch.zeros(1), **sd}, tmp_path / "intkey.pt")
    proc = run_cli("models", "convert", str(tmp_path / "intkey.pt"), str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and "got a key 0 that is not a name" in proc.stderr, proc.stderr
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())["model"]
    (tmp_path / "m.txt").write_text(json.dumps({"model": cfg, "diffusion": {"noise_schedule": "linear", "steps": 4000}}))
    run_cli("models", "convert", str(pt), str(tmp_path / "t"), "--config", str(tmp_path / "m.txt"))
    assert json.loads((tmp_path / "t" / "config.json").read_text())["diffusion"]["steps"] == 4000
