"""The report's parts that must hold at scale: the loss curves read incrementally from TensorBoard (against
tensorboard's own reader), the grids shown per setting, damaged files, labels, the paper's lines."""

import json
import os
import re
import time
from dataclasses import asdict

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from eval.loss_history import loss_history


def _launch(tb, steps, offset=0.0, tag_values=lambda s: 1.0 / (s + 1)):
    w = SummaryWriter(str(tb))
    for s in steps:
        w.add_scalar("train/loss", tag_values(s) + offset, s)
        w.add_scalar("train/mse", 2 * tag_values(s) + offset, s)
        w.add_scalar("train/lr", 1e-4, s)  # not read
    w.close()
    time.sleep(0.01)  # the next launch's file starts later


def test_loss_history_equals_tensorboards_reader_and_reads_only_what_is_new(tmp_path):
    """Every point of the training tags, as tensorboard's EventAccumulator reads them; the second call reads
    on from the cached offsets (a file that grew, a new launch), giving what a fresh read gives."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, cache = tmp_path / "tb", tmp_path / "cache" / "loss.json"
    _launch(tb, range(0, 300, 3))
    first = loss_history(tb, cache)
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("train/loss", "train/mse"):
        assert first[tag] == [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]
    assert "train/vb" not in first and "train/lr" not in first
    _launch(tb, range(300, 600, 3))  # a second launch, going on
    cached = json.loads(cache.read_text())
    assert all(e["offset"] == os.path.getsize(tb / name) for name, e in cached["files"].items())
    again = loss_history(tb, cache)
    assert again == loss_history(tb, None) and [s for s, _ in again["train/loss"]] == list(range(0, 600, 3))


def test_a_resumed_launch_replaces_the_steps_it_trained_again(tmp_path):
    """A launch resumed from an earlier checkpoint writes steps 150.. again: its points replace the first
    launch's from there, so the curve never doubles back; a record still being written is left for later."""
    tb = tmp_path / "tb"
    _launch(tb, range(0, 300, 10))
    _launch(tb, range(150, 400, 10), offset=10.0)
    loss = loss_history(tb)["train/loss"]
    steps = [s for s, _ in loss]
    assert steps == sorted(steps) and steps == list(range(0, 150, 10)) + list(range(150, 400, 10))
    assert all(v > 10 for s, v in loss if s >= 150) and all(v < 10 for s, v in loss if s < 150)
    newest = max(tb.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    with open(newest, "ab") as f:  # a record cut short (the writer is mid-write)
        f.write((1000).to_bytes(8, "little") + b"\0" * 20)
    assert loss_history(tb)["train/loss"] == loss


def test_loss_history_is_bounded(tmp_path):
    tb = tmp_path / "tb"
    _launch(tb, range(10000))
    loss = loss_history(tb, tmp_path / "c.json", limit=500)["train/loss"]
    assert 250 <= len(loss) <= 500 and loss[0][0] == 0 and loss[-1][0] == 9999  # the first and the newest kept
    assert [s for s, _ in loss] == sorted(s for s, _ in loss)


def test_grids_per_setting_are_the_first_last_and_evenly_between():
    from eval.report import grid_rows

    rows = [{"label": lab, "images": 1000 * i, "snapshot_name": f"img{i:012d}"} for i in range(40)
            for lab in ("fast", "guided")]
    shown = grid_rows(rows, per_setting=6)
    for lab in ("fast", "guided"):
        images = [r["images"] for r in shown if r["label"] == lab]
        assert len(images) == 6 and images[0] == 0 and images[-1] == 39000 and images == sorted(images)
        # evenly between: 39 snapshot intervals over 5 gaps are 7.8 each, so every gap is 7 or 8 snapshots
        # (the first five and the last, or any bunching, has a gap of 1 or of 34)
        gaps = {b - a for a, b in zip(images, images[1:])}
        assert gaps <= {7000, 8000}, images
    few = rows[:6]  # 3 snapshots each: all shown
    assert len(grid_rows(few, per_setting=6)) == 6


def test_kimg_is_exact_to_the_image():
    from eval.report import kimg

    assert kimg(2_147_483_648) == "2147483.648" and kimg(1_000_000_500) == "1000000.5" and kimg(64) == "0.064"
    assert kimg(0) == "0" and kimg(1_000) == "1"


def report_figures(html: str) -> dict[str, list]:
    """The report's sample grids read back with the standard library's HTML parser (entities decoded): caption ->
    [(title, image as decoded by PIL, figcaption text or None), ...] in page order; a caption seen before (every
    cascade's stages have the same one) gets " #2", " #3", ... rather than replacing the earlier grid."""
    import base64
    import io
    from html.parser import HTMLParser

    from PIL import Image

    grids, state = {}, {"caption": None, "in": None, "p": ""}

    class Reader(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "p":
                state["p"], state["in"] = "", "p"
            elif tag == "div" and a.get("class") == "samples":
                caption, n = state["p"], 1
                while caption in grids:
                    n += 1
                    caption = f"{state['p']} #{n}"
                state["caption"] = caption
                grids[state["caption"]] = []
            elif tag == "img" and state["caption"] is not None and a["src"].startswith("data:image/"):
                data = base64.b64decode(a["src"].split(",", 1)[1])
                grids[state["caption"]].append([a["title"], np.asarray(Image.open(io.BytesIO(data))), None])
            elif tag == "figcaption":
                state["in"] = "figcaption"

        def handle_endtag(self, tag):
            if tag == "div":
                state["caption"] = None
            state["in"] = None

        def handle_data(self, data):
            if state["in"] == "p":
                state["p"] += data
            elif state["in"] == "figcaption":
                cell = grids[state["caption"]][-1]
                cell[2] = (cell[2] or "") + data

    Reader().feed(html)
    return {k: [tuple(c) for c in v] for k, v in grids.items()}


def test_sample_grids_show_each_image_with_its_seed_and_the_class_it_was_sampled_for(tmp_path):
    """Under each sample its class, by name from the run's training shards' class table (an ImageNet synset's
    first name, escaped), by index where that table is not readable; the image itself unchanged and titled with
    its seed (the setting's seed_start on). The progressive decoding's rows (its first seeds) say their classes."""
    from test_eval_farm import make_run

    from eval.report import write_report
    from eval.settings import EVALUATOR_VERSION

    run = make_run(tmp_path / "run", kimgs=(1,))
    shards = tmp_path / "shards"
    shards.mkdir()
    names = ["tench, Tinca tinca", "<b>goldfish</b>, Carassius auratus", "great white shark"]
    (shards / "manifest.json").write_text(json.dumps({"classes": [
        {"index": i, "id": f"n{i:08d}", "name": n} for i, n in enumerate(names)]}))
    options = json.loads((run / "training_options.json").read_text())
    (run / "training_options.json").write_text(json.dumps({**options, "data": str(shards)}))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 20)
    key_dir = run / "eval" / "img000000001000--guided--abc"
    (key_dir / "samples").mkdir(parents=True)
    np.savez(key_dir / "samples" / "samples-00000500-00000519.npz", arr_0=images, arr_1=labels)
    np.savez(key_dir / "progressive.npz", arr_0=np.zeros((3, 4, 8, 8, 3), np.uint8))  # 3 frames of the first 4 seeds
    (key_dir / "metrics.json").write_text(json.dumps({
        "key": key_dir.name, "snapshot_name": "img000000001000", "images": 1000,
        "setting": {"name": "guided", "seed_start": 500, "num": 20}, "ref": "ref.npz",
        "evaluator": EVALUATOR_VERSION, "metrics": {"fid": 10.0, "num_samples": 20}}))
    html = write_report(run).read_text()
    assert "<b>goldfish" not in html  # escaped
    [(caption, cells)] = report_figures(html).items()
    assert caption == "img000000001000 (1 kimg), guided"
    assert [t for t, _, _ in cells] == [f"seed {500 + i}" for i in range(16)]  # the first 16, in seed order
    np.testing.assert_array_equal(np.stack([im for _, im, _ in cells]), images[:16])
    short = ["tench", "<b>goldfish</b>", "great white shark"]
    assert [c for _, _, c in cells] == [short[k] for k in labels[:16]]
    rows = re.search(r"one row\s+per seed \(sampled for, top to bottom: (.*?)\), as in", html, re.S).group(1)
    assert __import__("html").unescape(rows) == ", ".join(short[k] for k in labels[:4])
    (shards / "manifest.json").unlink()  # the shards moved: the classes by index
    assert [c for _, _, c in report_figures(write_report(run).read_text())[caption]] == [
        f"class {k}" for k in labels[:16]]


def test_large_samples_are_shown_as_jpeg_and_small_ones_pixel_exact(tmp_path):
    """A report shows dozens of samples: at 256 px and more each is a JPEG (quality 90, no chroma subsampling)
    several times smaller than its PNG and within a few levels of it, drawn smoothly when the page scales it;
    below 128 px each stays a PNG, pixel-exact and enlarged without smoothing
    (test_sample_grids_show_each_image_with_its_seed_and_the_class_it_was_sampled_for)."""
    import base64

    from PIL import Image
    from sklearn.datasets import load_sample_images
    from test_eval_farm import make_run

    from eval.report import _png, write_report
    from eval.settings import EVALUATOR_VERSION

    photo = Image.fromarray(load_sample_images().images[0][:427, :427])  # a real photograph
    images = np.stack([np.asarray(photo.resize((256, 256), Image.BICUBIC)),
                       np.asarray(photo.rotate(90).resize((256, 256), Image.BICUBIC))])
    run = make_run(tmp_path / "run", kimgs=(1,))
    key_dir = run / "eval" / "img000000001000--big--abc"
    (key_dir / "samples").mkdir(parents=True)
    np.savez(key_dir / "samples" / "samples-00000000-00000001.npz", arr_0=images)
    (key_dir / "metrics.json").write_text(json.dumps({
        "key": key_dir.name, "snapshot_name": "img000000001000", "images": 1000,
        "setting": {"name": "big", "num": 2}, "ref": "ref.npz",
        "evaluator": EVALUATOR_VERSION, "metrics": {"fid": 10.0, "num_samples": 2}}))
    html = write_report(run).read_text()
    [cells] = report_figures(html).values()
    for (_, shown, _), image in zip(cells, images, strict=True):
        assert shown.shape == image.shape and np.abs(shown.astype(int) - image).mean() < 4
    srcs = re.findall(r'<figure><img( class="px")? src="data:image/(\w+);base64,([^"]+)"', html)
    assert [(px, kind) for px, kind, _ in srcs] == [("", "jpeg")] * 2
    for (_, _, data), image in zip(srcs, images):
        assert len(data) * 3 < len(_png(image))  # (measured: 3.7x smaller)
        assert Image.open(__import__("io").BytesIO(base64.b64decode(data))).format == "JPEG"


def test_a_cascades_grid_shows_its_stages(tmp_path, capsys):
    """A cascade's grid is followed by its stages for its first seeds: each base-model sample (the last frame of
    its progressive decoding) beside the upsampled image, pixel for pixel; a plain evaluation has none, and a
    cascade whose progressive.npz is damaged loses its stages (said once), not its grid."""
    from test_eval_farm import make_run

    from eval.report import write_report
    from eval.settings import EVALUATOR_VERSION

    run = make_run(tmp_path / "run", kimgs=(1,))
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)  # 3 frames of 4 seeds; the last: the samples
    high = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for name, setting in (("cascade", {"upsampler": "/snaps/up"}), ("plain", {})):
        key_dir = run / "eval" / f"img000000001000--{name}--abc"
        (key_dir / "samples").mkdir(parents=True)
        np.savez(key_dir / "samples" / "samples-00000007-00000012.npz", arr_0=high if name == "cascade" else base[-1])
        np.savez(key_dir / "progressive.npz", arr_0=base)
        (key_dir / "metrics.json").write_text(json.dumps({
            "key": key_dir.name, "snapshot_name": "img000000001000", "images": 1000,
            "setting": {"name": name, "seed_start": 7, **setting}, "ref": "ref.npz", "evaluator": EVALUATOR_VERSION,
            "metrics": {"fid": 10.0, "num_samples": 6}}))
    figures = report_figures(write_report(run).read_text())
    [stages] = [v for k, v in figures.items() if k.startswith("The cascade's stages")]
    assert [(t, c) for t, _, c in stages] == [(f"seed {7 + i}", c) for i in range(4)
                                              for c in ("16x16 base", "32x32 upsampled")]
    for i in range(4):
        np.testing.assert_array_equal(stages[2 * i][1], base[-1, i])
        np.testing.assert_array_equal(stages[2 * i + 1][1], high[i])
    assert len(figures) == 3 and {"img000000001000 (1 kimg), cascade", "img000000001000 (1 kimg), plain"} < set(figures)
    prog = run / "eval" / "img000000001000--cascade--abc" / "progressive.npz"
    prog.write_bytes(prog.read_bytes()[:100])
    capsys.readouterr()
    figures = report_figures(write_report(run).read_text())
    assert sorted(figures) == ["img000000001000 (1 kimg), cascade", "img000000001000 (1 kimg), plain"]
    assert capsys.readouterr().err.count("progressive.npz: unreadable") == 1


def test_the_paper_lines_match_the_preset_exactly_first():
    """ImageNet-256 unconditional and LSUN share an architecture (LSUN trained with dropout 0.1): each gets
    its own paper numbers."""
    from eval.published import PUBLISHED, published_for
    from models.presets import get_preset

    for name in PUBLISHED:
        assert published_for(asdict(get_preset(name).config()))[0] == name
    assert published_for(asdict(get_preset("adm-256-uncond").config()))[1]["ADM (2M steps at batch 256)"][
        "fid"] == 26.21


def test_a_damaged_file_costs_its_picture_not_the_report(tmp_path, capsys):
    """One evaluation's progressive.npz or sample shard cut short (a copy, a full disk): the report is
    written without that picture and says which file; a run without training_options.json takes its
    configuration (and the paper's lines) from its snapshots."""
    from test_eval_farm import make_run

    from eval.report import write_report

    run = make_run(tmp_path / "run", kimgs=(1, 2))
    (run / "training_options.json").unlink()
    for i, k in enumerate((1, 2)):
        key_dir = run / "eval" / f"img{k * 1000:012d}--fast--abc"
        (key_dir / "samples").mkdir(parents=True)
        np.savez(key_dir / "samples" / "samples-00000000-00000003.npz",
                 arr_0=np.full((4, 32, 32, 3), 60 * i, np.uint8))
        np.savez(key_dir / "progressive.npz", arr_0=np.zeros((3, 2, 32, 32, 3), np.uint8))
        (key_dir / "metrics.json").write_text(json.dumps({
            "key": key_dir.name, "snapshot": str(run / "snapshots" / f"img{k * 1000:012d}"),
            "snapshot_name": f"img{k * 1000:012d}", "images": k * 1000, "setting": {"name": "fast"},
            "ref": "ref.npz", "evaluator": __import__("eval.settings").settings.EVALUATOR_VERSION,
            "metrics": {"fid": 10.0 - k, "num_samples": 4}}))
    newest = run / "eval" / "img000000002000--fast--abc"
    for damaged in (newest / "progressive.npz", newest / "samples" / "samples-00000000-00000003.npz"):
        damaged.write_bytes(damaged.read_bytes()[:100])
    html = write_report(run).read_text()
    err = capsys.readouterr().err
    assert "progressive.npz: unreadable" in err and f"{newest / 'samples'}: unreadable" in err
    assert "Progressive decoding" in html and "img000000001000, fast" in html  # the older one's instead
    assert html.count("kimg), fast") == 1  # the damaged evaluation's grid left out
    config = json.loads((run / "report.json").read_text())["config"]
    assert config["model"]["model_channels"] == 32 and config["images"] == 2000  # the newest snapshot's


def test_references_with_one_file_name_are_told_apart(tmp_path):
    """Two references named ref.npz in two folders: each series is labelled by as much of its path as tells
    it from the other, in results and so in the report (one zigzag series before)."""
    from eval.registry import results, short_names
    from eval.settings import EVALUATOR_VERSION

    assert short_names(["/d/imagenet64/ref.npz", "/d/imagenet64-val/ref.npz", "/e/x.npz"]) == {
        "/d/imagenet64/ref.npz": "imagenet64/ref.npz", "/d/imagenet64-val/ref.npz": "imagenet64-val/ref.npz",
        "/e/x.npz": "x.npz"}
    run = tmp_path / "run"
    for i, ref in enumerate(("/d/imagenet64/ref.npz", "/d/imagenet64-val/ref.npz")):
        key_dir = run / "eval" / f"img000000001000--fast--{i}"
        key_dir.mkdir(parents=True)
        (key_dir / "metrics.json").write_text(json.dumps({
            "key": key_dir.name, "snapshot_name": "img000000001000", "images": 1000, "setting": {"name": "fast"},
            "ref": ref, "evaluator": EVALUATOR_VERSION, "metrics": {"fid": 10.0 + i, "num_samples": 4}}))
    assert sorted(r["label"] for r in results(run)) == ["fast vs imagenet64-val/ref.npz", "fast vs imagenet64/ref.npz"]


def test_tensorboard_series_never_mix_two_families_of_one_name(tmp_path):
    """A setting name reused with another --num or reference: its points go to a series of their own
    (`fast [hash]`), the first family keeping the plain name for good, instead of one curve of both."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from eval.farm import log_tensorboard

    run = tmp_path / "run"

    def record(key, images, num, ref, fid):
        return {"key": key, "snapshot_name": f"img{images:012d}", "images": images, "ref": ref,
                "setting": {"name": "fast", "steps": "ddim2", "num": num}, "metrics": {"fid": fid, "num_samples": num}}

    log_tensorboard(run, record("a", 1000, 6, "/r/ref.npz", 10.0))
    log_tensorboard(run, record("b", 2000, 6, "/r/ref.npz", 9.0))
    log_tensorboard(run, record("c", 1000, 8, "/r/ref.npz", 20.0))  # another N under the same name
    log_tensorboard(run, record("d", 1000, 6, "/other/ref.npz", 30.0))  # another reference
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    fid_tags = sorted(t for t in acc.Tags()["scalars"] if t.endswith("/fid"))
    assert len(fid_tags) == 3 and "eval/fast/fid" in fid_tags
    assert [(e.step, e.value) for e in acc.Scalars("eval/fast/fid")] == [(1000, 10.0), (2000, 9.0)]
    others = {acc.Scalars(t)[0].value for t in fid_tags if t != "eval/fast/fid"}
    assert others == {20.0, 30.0} and all(re.fullmatch(r"eval/fast \[[0-9a-f]{6}\]/fid", t)
                                          for t in fid_tags if t != "eval/fast/fid")


def test_a_tensorboard_point_cut_short_is_written_by_the_next_finish(tmp_path, monkeypatch):
    """An evaluation's events file is its "logged" mark (finish, the scheduler's pass): one that a task killed
    while writing it left without its point must not be taken for the point, nor be seen before it is whole."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from eval.farm import finish

    run = tmp_path / "run"
    key_dir = run / "eval" / "k"
    key_dir.mkdir(parents=True)
    setting = {"name": "fast", "steps": "ddim2", "num": 4}
    (key_dir / "setting.json").write_text(json.dumps({"run_dir": str(run), "setting": setting}))
    (key_dir / "metrics.json").write_text(json.dumps({
        "key": "k", "snapshot_name": "img000000001000", "images": 1000, "ref": "/r/ref.npz", "setting": setting,
        "metrics": {"fid": 12.5, "num_samples": 4}}))
    real = SummaryWriter.add_scalar

    def killed(self, *args, **kwargs):  # the task ends (a time limit, a cancel) once its writer exists
        assert list((run / "tensorboard").glob("*.eval-k")) == []  # not visible before it is whole
        raise KeyboardInterrupt

    monkeypatch.setattr(SummaryWriter, "add_scalar", killed)
    with pytest.raises(KeyboardInterrupt):
        finish(key_dir)
    assert list((run / "tensorboard").glob("*.eval-k")) == []
    monkeypatch.setattr(SummaryWriter, "add_scalar", real)
    finish(key_dir)  # the scheduler's next pass
    [events] = (run / "tensorboard").glob("*.eval-k")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/fast/fid")] == [(1000, 12.5)]
    assert [p.name for p in key_dir.iterdir() if p.name.startswith("tensorboard.")] == []


def _finished(key_dir, name, images, setting="fast", **metrics):
    from eval.settings import EVALUATOR_VERSION

    key_dir.mkdir(parents=True, exist_ok=True)
    (key_dir / "metrics.json").write_text(json.dumps({
        "key": key_dir.name, "snapshot_name": name, "images": images, "setting": {"name": setting},
        "ref": "ref.npz", "evaluator": EVALUATOR_VERSION, "metrics": {"num_samples": 4, **metrics}}))


def test_every_series_has_one_colour_in_every_panel_and_one_legend_entry():
    """A setting with IS (only where --inception-weights was given) beside one without: each series keeps
    its colour across the panels and the one legend names each once (the last panel's legend named only
    the series drawn there, in that panel's colours)."""
    from eval.report import metric_figure

    rows = [{"snapshot_name": f"img{k:012d}", "label": label, "images": k, "metrics": metrics}
            for k in (1000, 2000) for label, metrics in
            (("plain", {"fid": 9.0, "precision": 0.5}), ("with IS", {"fid": 8.0, "inception_score": 3.0}),
             ("x" * 150, {"fid": 7.0}))]
    fig = metric_figure(rows, {"ADM (paper)": {"fid": 2.07}})
    (legend,) = fig.legends
    names = [t.get_text() for t in legend.get_texts()]
    assert names[:2] == ["plain", "with IS"] and names[2].startswith("xxx") and len(names[2]) <= 60
    assert names[3] == "paper: ADM (paper)" and len(names) == 4
    colour = dict(zip(names, (h.get_color() for h in legend.legend_handles)))
    assert len(set(colour.values())) == 4
    drawn = [(line.get_label(), line.get_color()) for ax in fig.axes for line in ax.get_lines()]
    assert sum(label == "plain" for label, _ in drawn) == 2  # FID and precision
    assert all(colour[label] == c for label, c in drawn)


def test_the_json_and_markdown_stay_valid_with_any_value(tmp_path):
    """A NaN or infinite metric gives null in report.json (a bare NaN is not JSON: jq and browsers refuse
    the file); a | or a line break in a name keeps each Markdown table row one row of its columns."""
    from eval.report import write_report

    run = tmp_path / "run"
    _finished(run / "eval" / "a", "img|000000001000", 1000, setting="odd|name", fid=float("nan"), sfid=float("inf"))
    _finished(run / "eval" / "b", "img000000002000", 2000, fid=5.0, sfid=6.0)
    failed = run / "eval" / "c"
    failed.mkdir()
    (failed / "failed.json").write_text(json.dumps({"snapshot_name": "img3", "setting": {"name": "fast"},
                                                    "attempts": 3, "last_error": "line one\nline two | more",
                                                    "evaluator": __import__("eval.settings").settings.EVALUATOR_VERSION}))
    write_report(run)
    data = json.loads((run / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert {r["snapshot_name"]: r["metrics"]["fid"] for r in data["rows"]} == {"img|000000001000": None,
                                                                               "img000000002000": 5.0}
    md = (run / "report.md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 4 and all(len(re.split(r"(?<!\\)\|", line)) == len(re.split(r"(?<!\\)\|", table[0]))
                                   for line in table)
    assert [line for line in md if line.startswith("FAILED")] == [
        "FAILED: img3 / fast after 3 attempts: line one line two \\| more"]


@pytest.mark.parametrize("damage, field", [
    (lambda r: r.pop("key"), "key"), (lambda r: r.pop("metrics"), "metrics"),
    (lambda r: r["metrics"].update(fid=None), "metrics fid"), (lambda r: r.update(images="12"), "images"),
    (lambda r: r["setting"].pop("name"), "setting")])
def test_a_damaged_record_is_left_out_naming_its_field(tmp_path, capsys, damage, field):
    """A metrics.json that parses but lacks what the listing and report read (an edit, another tool's file):
    left out with a line naming the file and the field, the other evaluations reported (it stopped the
    whole report with a KeyError or TypeError)."""
    from eval.registry import failures, results
    from eval.report import write_report

    run = tmp_path / "run"
    _finished(run / "eval" / "good", "img000000001000", 1000, fid=5.0)
    _finished(run / "eval" / "bad", "img000000002000", 2000, fid=4.0)
    record = json.loads((run / "eval" / "bad" / "metrics.json").read_text())
    damage(record)
    (run / "eval" / "bad" / "metrics.json").write_text(json.dumps(record))
    (run / "eval" / "gone").mkdir()
    (run / "eval" / "gone" / "failed.json").write_text(json.dumps({"snapshot_name": "img3", "attempts": 3}))
    assert [r["snapshot_name"] for r in results(run)] == ["img000000001000"] and failures(run) == []
    err = capsys.readouterr().err
    assert f"{run / 'eval' / 'bad' / 'metrics.json'}: unreadable ({field}" in err
    assert f"{run / 'eval' / 'gone' / 'failed.json'}: unreadable (setting" in err
    assert "img000000001000" in write_report(run).read_text()


def test_the_page_shows_the_intro_commands_configuration_and_plots_as_written(tmp_path):
    """What the demo hands the report reads back from the page: the intro's paragraphs, the commands one per
    line, the run's configuration as YAML that loads to the same values, paths that wrap only after a / and
    stay escaped, and each plot shown at 100 page pixels per inch of the PNG drawn at PLOT_DPI."""
    import base64
    import html as html_lib
    import io

    import yaml
    from PIL import Image

    from eval.report import PLOT_DPI, write_report

    run = tmp_path / "run"
    options = {"task": "diffusion", "model": {"channel_mult": [1.0, 2.0], "attention_resolutions": [8],
                                              "note": "a: <b> & 'c'"}, "betas": [0.9, 0.999], "power_ema": [],
               "diffusion": {"steps": 1000, "noise_schedule": "cosine"}, "seed": 0}
    run.mkdir()
    (run / "training_options.json").write_text(json.dumps(options))
    for k in (1, 2):
        _finished(run / "eval" / f"k{k}", f"img{k:012d}", 1000 * k, fid=10.0 / k)
        record = json.loads((run / "eval" / f"k{k}" / "metrics.json").read_text())
        record["setting"]["classifier"] = "/runs/<cls>/snapshots/img000000024000"
        (run / "eval" / f"k{k}" / "metrics.json").write_text(json.dumps(record))
    page = write_report(run, intro="First paragraph,\ncontinued.\n\nSecond <one>.",
                        commands=["adm data write a b", "adm report <run>"]).read_text()
    assert "<p>First paragraph, continued.</p>" in page and "<p>Second &lt;one&gt;.</p>" in page
    assert "<pre>adm data write a b\nadm report &lt;run&gt;</pre>" in page
    config = re.search(r"<h2>Configuration</h2><pre>(.*?)</pre>", page, re.S).group(1)
    assert yaml.safe_load(html_lib.unescape(config)) == options
    assert "channel_mult: [1.0, 2.0]" in html_lib.unescape(config)  # lists of numbers on one line
    assert "/<wbr>runs/<wbr>&lt;cls&gt;/<wbr>snapshots/<wbr>img000000024000" in page
    plots = re.findall(r'<img src="data:image/png;base64,([^"]+)" width="(\d+)">', page)
    assert len(plots) == 1  # the metric curves (this run has no TensorBoard losses)
    for png, width in plots:
        drawn = Image.open(io.BytesIO(base64.b64decode(png))).width
        assert int(width) == round(drawn * 100 / PLOT_DPI)
