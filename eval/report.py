"""`adm report RUN_DIR`: a self-contained report of a run (HTML, plus markdown and JSON).

Metric curves against training images with the paper's numbers as reference lines, a table per
snapshot, sample grids per snapshot and setting (each sample captioned with its class; a cascade's
stages side by side), DDPM's progressive decoding, training-loss curves
from TensorBoard, the run's configuration. Images are embedded, so the page opens offline; every
value goes through jinja2's autoescaping.
"""

import argparse
import base64
import html
import io
import json
import sys
from pathlib import Path

import numpy as np

from . import registry
from .atomic import standard_json, write_text_atomic
from .npzfile import StreamedArray
from .published import published_for

METRICS = ("fid", "sfid", "precision", "recall", "inception_score")
LABELS = {"fid": "FID", "sfid": "sFID", "precision": "precision", "recall": "recall", "inception_score": "IS"}

TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td.l,th.l{text-align:left}.nw{white-space:nowrap}td.path{overflow-wrap:anywhere;font-size:85%;min-width:8em}
img{max-width:100%;height:auto}img.px{image-rendering:pixelated}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:85%}.fail{color:#b00}.samples{display:grid;gap:4px;margin:0 0 1.2em}
.samples figure{margin:0}.samples img{width:100%;display:block}.samples figcaption{font-size:75%;
text-align:center;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}</style></head><body>
<h1>{{ title }}</h1>
{% for paragraph in intro %}<p>{{ paragraph }}</p>
{% endfor %}{% if commands %}<pre>{{ commands|join("\n") }}</pre>{% endif %}
{% if failures %}<h2 class="fail">Failed evaluations</h2><ul>{% for f in failures %}<li class="fail">{{ f.snapshot_name }}
 / {{ f.setting.name }}: {{ f.attempts }} attempts; last error: {{ f.last_error or "not recorded" }}</li>{% endfor %}</ul>{% endif %}
{% if curves %}<h2>Metrics against training progress</h2>
<p>Lower FID and sFID are better; higher precision, recall and IS are better.{% if preset %} Dashed lines: the
paper's numbers for {{ preset }} (50,000 samples; compare only when this run uses 50,000 samples and ADM's
reference batch).{% endif %}</p><img src="data:image/png;base64,{{ curves.png }}" width="{{ curves.width }}">{% endif %}
<h2>Results</h2>
{% if rows %}<table><tr><th class="l">snapshot</th><th>kimg</th><th class="l">setting</th><th>N</th>
{% for m in metric_names %}<th>{{ labels[m] }}</th>{% endfor %}</tr>
{% for r in rows %}<tr><td class="l">{{ r.snapshot_name }}</td><td>{{ r.kimg }}</td><td class="l">{{ r.label }}</td>
<td>{{ r.metrics.num_samples }}</td>{% for m in metric_names %}<td>{{ r.fmt[m] }}</td>{% endfor %}</tr>{% endfor %}
</table>{% else %}<p>No evaluation has finished yet.</p>{% endif %}
{% if settings %}<h3>Settings</h3><table><tr><th class="l">name</th><th class="l">sampler</th><th>guidance scale</th>
<th class="l">weights</th><th>samples</th><th>first seed</th><th class="l">classifier</th><th class="l">upsampler</th>
<th class="l">arithmetic</th><th class="l">P/R distances</th><th class="l">reference</th></tr>
{% for s in settings %}<tr><td class="l nw">{{ s.name }}</td><td class="l">{{ s.steps }}</td><td>{{ s.scale }}</td>
<td class="l">{{ s.weights }}</td><td>{{ s.num }}</td><td>{{ s.seed_start }}</td>
<td class="l path">{{ (s.classifier or "-") | breakable }}</td><td class="l path">{{ (s.upsampler or "-") | breakable }}</td>
<td class="l">{{ s.precision }}</td><td class="l">{{ s.pr_distance }}</td>
<td class="l path">{{ s.ref | breakable }}</td></tr>
{% endfor %}</table>{% endif %}
{% if loss %}<h2>Training loss</h2><img src="data:image/png;base64,{{ loss.png }}" width="{{ loss.width }}">{% endif %}
{% if grids %}<h2>Samples by snapshot and setting</h2><p>The first images of each evaluation in seed order
(hover for an image's seed), under each the class it was sampled for (labels drawn per seed){{ grid_note }}.</p>
{% macro figures(cells, cols, cell) %}<div class="samples" style="grid-template-columns:repeat({{ cols }},minmax(0,{{ cell
}}px))">{% for c in cells %}
<figure><img{% if c.src.startswith("data:image/png") %} class="px"{% endif %} src="{{ c.src }}" title="{{ c.title }}" alt="{{ c.title }}">{% if c.label is not none
%}<figcaption>{{ c.label }}</figcaption>{% endif %}</figure>{% endfor %}</div>{% endmacro %}
{% for g in grids %}<p>{{ g.caption }}</p>
{{ figures(g.cells, g.cols, g.cell) }}{% if g.stages %}<p>The cascade's stages for its first seeds: each base-model
sample (its progressive decoding's last frame), then the upsampler's output from it.</p>
{{ figures(g.stages, g.stages|length, g.cell) }}{% endif %}{% endfor %}{% endif %}
{% if progressive %}<h2>Progressive decoding</h2><p>{{ progressive.caption }}: the model's prediction of the
final image at evenly spaced steps of the reverse process, left (pure noise) to right (the sample), one row
per seed{% if progressive.rows %} (sampled for, top to bottom: {{ progressive.rows }}){% endif %}, as in DDPM's
figure.</p><img{% if progressive.src.startswith("data:image/png") %} class="px"{% endif %} src="{{ progressive.src }}" width="{{ progressive.width }}">{% endif %}
{% if training_grids %}<h2>Training-time EMA grids</h2>{% for g in training_grids %}<p>{{ g.caption }}<br>
<img class="px" src="data:image/png;base64,{{ g.png }}" width="256"></p>{% endfor %}{% endif %}
<h2>Configuration</h2><pre>{{ config }}</pre>
</body></html>"""


PHOTO_SIDE = 128  # samples this large are embedded as JPEG: a report holds dozens, and a 512 px PNG is 0.5 MB


def _image_src(image: np.ndarray, scale: int = 1, side: int | None = None) -> str:
    """A data: URI of a sample (or a tiling of samples `side` pixels high each): PNG, pixel-exact, below
    PHOTO_SIDE, where the page enlarges it pixel for pixel; JPEG at quality 90 without chroma subsampling
    above it, which a reader cannot tell apart at the size shown and which is several times smaller."""
    from PIL import Image

    if (side or min(image.shape[:2])) < PHOTO_SIDE:
        return "data:image/png;base64," + _png(image, scale)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90, subsampling=0)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _png(image: np.ndarray, scale: int = 1) -> str:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PLOT_DPI = 150  # plots drawn at 1.5x the size they are shown at: sharp on high-density screens


def _plot(fig) -> dict:
    """A matplotlib figure as an embedded PNG and the width it is shown at (100 page pixels per inch; the page
    scales it down smoothly where the window is narrower), and closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(fig)
    width = int.from_bytes(buf.getvalue()[16:20], "big")  # the PNG header's IHDR width
    return {"png": base64.b64encode(buf.getvalue()).decode(), "width": round(width * 100 / PLOT_DPI)}


def tile(images: np.ndarray, cols: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one grid image, `cols` per row, 2-pixel white gaps."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = im
    return out


def curve_series(rows: list[dict], metric: str) -> dict[str, tuple[list, bool]]:
    """name -> (sorted (kimg, value) points, post-hoc?). A post-hoc EMA sits at its training snapshot's
    image count: a series of its own per width (points, not a line), not a jump in the setting's curve."""
    series: dict[str, tuple[list, bool]] = {}
    for r in rows:
        if metric in r["metrics"]:
            width = registry.posthoc_width(r["snapshot_name"])
            name = r["label"] + (f" (post-hoc EMA, sigma_rel {width})" if width else "")
            series.setdefault(name, ([], bool(width)))[0].append(((r.get("images") or 0) / 1000, r["metrics"][metric]))
    return {k: (sorted(pts), posthoc) for k, (pts, posthoc) in series.items()}


def _literal(text: str) -> str:
    """A label matplotlib shows as written: a pair of $ would be parsed as math (and may not parse)."""
    return text.replace("$", r"\$")


def _short(label: str, limit: int = 60) -> str:
    """A legend entry of bounded length (the tables keep the whole name)."""
    return label if len(label) <= limit else label[:limit - 1] + "…"


def _metric_curves(rows: list[dict], published: dict) -> dict:
    return _plot(metric_figure(rows, published))


def metric_figure(rows: list[dict], published: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in METRICS if any(m in r["metrics"] for r in rows)]
    per_metric = {m: curve_series(rows, m) for m in present}
    # one colour per series in every panel (a setting with IS only where --inception-weights was given has no
    # point in the others), named once in one legend under the panels
    names = list(dict.fromkeys(name for series in per_metric.values() for name in series))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    marker = {name: "osD^v"[i // 10 % 5] for i, name in enumerate(names)}  # past ten colours, another marker
    paper = {label: f"C{(len(names) + j) % 10}" for j, label in enumerate(published)}
    fig, axes = plt.subplots(1, len(present), figsize=(2.6 * len(present), 2.5), squeeze=False)
    handles = {}
    for ax, m in zip(axes[0], present):
        for name, (pts, posthoc) in per_metric[m].items():
            handles[name], = ax.plot(*zip(*pts), marker="*" if posthoc else marker[name],
                                     ls="none" if posthoc else "-", color=colour[name], label=_literal(_short(name)))
        for label, vals in published.items():
            if m in vals:
                handles[f"paper: {label}"] = ax.axhline(vals[m], ls="--", lw=1, color=paper[label],
                                                        label=_literal(_short(f"paper: {label}")))
        ax.set_title(LABELS[m])
        ax.set_xlabel("training kimg")
    fig.tight_layout()
    order = [n for n in names + [f"paper: {label}" for label in published] if n in handles]
    fig.legend([handles[n] for n in order], [_literal(_short(n)) for n in order], fontsize=8, loc="upper center",
               bbox_to_anchor=(0.5, 0.0), ncol=max(1, min(len(order), 2 * len(present))),
               frameon=False)
    return fig


def _loss_curve(run_dir: Path):
    from .loss_history import loss_history

    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        return None
    curves = loss_history(tb, tb / LOSS_CACHE)
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.8))
    for tag, points in curves.items():
        ax.plot([step / 1000 for step, _ in points], [v for _, v in points], label=tag)
    ax.set_xlabel("training kimg")
    ax.set_yscale("log")
    ax.legend()
    return _plot(fig)


LOSS_CACHE = ".report-loss-cache.json"  # beside the event files it is read from (TensorBoard reads tfevents only)
GRIDS_PER_SETTING = 6  # sample grids per setting: the first and last snapshots and evenly between


def grid_rows(rows: list[dict], per_setting: int = GRIDS_PER_SETTING) -> list[dict]:
    """The evaluations whose sample grids the report shows: per setting the first and the last snapshot and
    evenly spaced ones between, `per_setting` in all (a grid of 256x256 images is megabytes of page), in
    training order."""
    by_label: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r.get("images") or 0, r["snapshot_name"])):
        by_label.setdefault(r["label"], []).append(r)
    shown = []
    for series in by_label.values():
        n, k = len(series), min(per_setting, len(series))
        picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
        shown += [series[i] for i in picks]
    return sorted(shown, key=lambda r: (r.get("images") or 0, r["label"]))


def _readable(path: Path, read):
    """read(), or None with a line naming the file when it is damaged (a copy cut short, a full disk): one
    evaluation's bad file costs its picture, not the whole report (which the schedule rewrites every pass)."""
    try:
        return read()
    except Exception as e:
        print(f"[report] {path}: unreadable ({type(e).__name__}: {e}); left out of the report", file=sys.stderr)
        return None


def _first_samples(key_dir: Path, count: int = 16):
    """An evaluation's first `count` images and their labels (None for an unconditional model sampled
    unguided, whose sample files hold no arr_1); None when it has no sample shard."""
    from .features import sample_shards

    shards = sample_shards(key_dir / "samples")
    if not shards:
        return None
    with np.load(shards[0]) as data:  # the first images only: a shard is 1000 images (200 MB at 256x256)
        images = StreamedArray(data, "arr_0")[:count]
        labels = data["arr_1"][:count] if "arr_1" in data.files else None
    return images, labels


def class_names(config: dict) -> dict[int, str]:
    """Class index -> name from the class table of the run's training shards (manifest.json; an ImageNet
    synset's first name), or {} where it cannot be read here (shards moved, a converted checkpoint's run)."""
    try:
        classes = json.loads((Path(config["data"]) / "manifest.json").read_text())["classes"]
        return {int(c["index"]): str(c.get("name") or c["id"]).split(",")[0].strip() for c in classes}
    except (KeyError, TypeError, ValueError, OSError):
        return {}


def class_label(index, names: dict[int, str]) -> str:
    """A class by name where the run's class table gives one (class_names), else by index."""
    return names.get(int(index), f"class {int(index)}")


def sample_cells(images: np.ndarray, labels, seed_start: int, names: dict[int, str]) -> list[dict]:
    """One figure per image: the image at its native size (_image_src; a small one the page scales up without
    smoothing), its seed and the class it was sampled for."""
    return [{"src": _image_src(im), "title": f"seed {seed_start + i}",
             "label": None if labels is None else class_label(labels[i], names)} for i, im in enumerate(images)]


def kimg(images: int) -> str:
    """Training images in kimg, exact to the image (:g rounded 2,147,483,648 images to 2.14748e+06)."""
    return f"{images / 1000:.3f}".rstrip("0").rstrip(".")


def run_config(run_dir: Path) -> dict:
    """The run's training options; for a run without them (converted released checkpoints, say), the newest
    snapshot's own record (its model section, preset and diffusion), so the paper's lines still match."""
    options = run_dir / "training_options.json"
    if options.is_file():
        try:
            return json.loads(options.read_text())
        except (OSError, ValueError) as e:
            print(f"[report] {options}: unreadable ({e}); configuration taken from the snapshots", file=sys.stderr)
    from models.snapshot import SnapshotError, read_config

    for snap in sorted((run_dir / "snapshots").glob("*"), reverse=True):
        try:
            meta = read_config(snap)
        except SnapshotError:
            continue
        return {k: v for k, v in meta.items() if k not in ("format", "version")}
    return {}


def build(run_dir: Path) -> dict:
    """Everything the report shows, as plain data (also written as report.json)."""
    run_dir = Path(run_dir)
    rows = registry.results(run_dir)
    for r in rows:
        r["kimg"] = kimg(r.get("images") or 0)
        r["fmt"] = {m: (f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-") for m in METRICS}
    config = run_config(run_dir)
    preset, published = published_for(config.get("model", {})) if config else (None, {})
    settings = list({r["label"]: {**r["setting"], "name": r["label"], "ref": r.get("ref")} for r in rows}.values())
    return {"run_dir": str(run_dir), "rows": rows, "failures": registry.failures(run_dir), "config": config,
            "preset": preset, "published": published, "settings": settings}


def _frames(key_dir: Path, cache: dict):
    """An evaluation's progressive decoding, (frames, N, H, W, 3) uint8, or None (none kept; damaged: said once
    per report, through `cache`)."""
    prog = key_dir / "progressive.npz"
    if prog not in cache:
        cache[prog] = _readable(prog, lambda: np.load(prog)["arr_0"]) if prog.is_file() else None
    return cache[prog]


def sample_grids(run_dir: Path, shown: list[dict], names: dict[int, str], frames_read: dict) -> tuple[list[dict], dict]:
    """The sample grids of the evaluations shown (sample_cells), a cascade's with its stages: each of its first
    seeds' base-model sample (the last frame of its progressive decoding, which watches the base model) beside
    the upsampler's output; and each shown evaluation's first images and labels by key."""
    grids, firsts = [], {}
    for r in shown:
        key_dir = registry.eval_root(run_dir) / r["key"]
        first = firsts[r["key"]] = _readable(key_dir / "samples", lambda: _first_samples(key_dir))
        if first is None:
            continue
        images, labels = first
        seed, side = int(r["setting"].get("seed_start", 0)), images.shape[2]
        grid = {"caption": f"{r['snapshot_name']} ({r['kimg']} kimg), {r['label']}",
                "cells": sample_cells(images, labels, seed, names), "cols": min(8, len(images)),
                "cell": side * max(1, 96 // side), "stages": None}
        frames = _frames(key_dir, frames_read) if r["setting"].get("upsampler") else None
        if frames is not None:
            base = frames[-1][:len(images)]
            grid["stages"] = [cell for i in range(len(base)) for cell in (
                {"src": _image_src(base[i]), "title": f"seed {seed + i}",
                 "label": f"{base.shape[2]}x{base.shape[1]} base"},
                {"src": _image_src(images[i]), "title": f"seed {seed + i}",
                 "label": f"{side}x{images.shape[1]} upsampled"})]
        grids.append(grid)
    return grids, firsts


def progressive_decoding(run_dir: Path, rows: list[dict], firsts: dict, names: dict[int, str],
                         frames_read: dict) -> dict | None:
    """The progressive decoding of the newest trained snapshot that has one (a post-hoc EMA's only if none),
    its rows (its first seeds) named by class where its evaluation's labels were read (`firsts`)."""
    for r in sorted(rows, key=lambda r: (r.get("images") or 0, not registry.posthoc_width(r["snapshot_name"])),
                    reverse=True):
        frames = _frames(registry.eval_root(run_dir) / r["key"], frames_read)
        if frames is None:
            continue
        f, n = frames.shape[:2]
        grid = tile(frames.transpose(1, 0, 2, 3, 4).reshape(f * n, *frames.shape[2:]), f)
        scale = max(1, 640 // grid.shape[1])
        labels = (firsts.get(r["key"]) or (None, None))[1]
        return {"caption": f"{r['snapshot_name']}, {r['label']}", "src": _image_src(grid, scale, frames.shape[2]),
                "width": grid.shape[1] * scale, "rows": None if labels is None or len(labels) < n else ", ".join(
                    class_label(k, names) for k in labels[:n])}
    return None


def write_report(run_dir: Path, out_dir: Path | None = None, intro: str | None = None,
                 commands: list[str] | None = None) -> Path:
    """Write report.html/.md/.json into out_dir (default: the run directory); `intro` replaces the
    opening paragraph (the demo says what it did; a blank line starts another paragraph), `commands` are
    shown under it as a block, one per line."""
    import jinja2

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    data = build(run_dir)
    rows = data["rows"]
    names, frames_read = class_names(data["config"]), {}
    grids, firsts = sample_grids(run_dir, grid_rows(rows), names, frames_read)
    progressive = progressive_decoding(run_dir, rows, firsts, names, frames_read)
    training_grids = [{"caption": p.stem, "png": base64.b64encode(p.read_bytes()).decode()}
                      for p in sorted((run_dir / "grids").glob("*.png"))[-4:]]
    metric_names = [m for m in METRICS if any(m in r["metrics"] for r in rows)]
    env = jinja2.Environment(autoescape=True)
    env.filters["breakable"] = breakable
    html = env.from_string(TEMPLATE).render(
        title=f"ADM run report: {run_dir.name}",
        intro=[" ".join(p.split()) for p in (intro or (
            f"Run directory {run_dir}. Each (snapshot, setting) was sampled from the snapshot's weights with "
            "per-seed noise and evaluated with the FID Inception network (ADM's evaluator: FID and sFID against "
            "the reference statistics, precision and recall with k=3 against the reference images).")).split("\n\n")],
        commands=commands,
        failures=data["failures"], curves=_metric_curves(rows, data["published"]) if rows else None,
        preset=data["preset"], rows=rows, metric_names=metric_names, labels=LABELS, settings=data["settings"],
        loss=_loss_curve(run_dir), grids=grids, progressive=progressive, training_grids=training_grids,
        grid_note=(f"; {len(firsts)} of {len(rows)} evaluations, per setting the first and last snapshots and "
                   "evenly between" if len(firsts) < len(rows) else ""),
        config=config_yaml(data["config"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.html", html)
    write_text_atomic(out_dir / "report.json", standard_json(data, indent=2, default=str) + "\n")
    write_text_atomic(out_dir / "report.md", _markdown(data, metric_names))
    return out_dir / "report.html"


def config_yaml(config: dict) -> str:
    """The run's configuration as the YAML its presets are written in: sections as blocks, lists of numbers or
    names inline (`channel_mult: [1, 2, 3, 4]`)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def sequence(dumper, items):
        flat = not any(isinstance(x, (dict, list, tuple)) for x in items)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flat)

    Dumper.add_representer(list, sequence)
    Dumper.add_representer(tuple, sequence)
    return yaml.dump(config, Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=110)


def breakable(path) -> "markupsafe.Markup":
    """A path, escaped, that a narrow table cell may wrap after each / (not inside a name)."""
    import markupsafe

    return markupsafe.Markup("/<wbr>").join(markupsafe.escape(str(path)).split("/"))


def _cell(value) -> str:
    """A Markdown table cell (or line) that stays one: | escaped, line breaks as spaces."""
    return " ".join(str(value).splitlines()).replace("|", "\\|")


def _markdown(data: dict, metric_names: list[str]) -> str:
    """report.md, every value HTML-escaped (Markdown viewers render inline HTML)."""
    lines = [f"# ADM run report: {_cell(Path(data['run_dir']).name)}", ""]
    if data["rows"]:
        lines += ["| snapshot | kimg | setting | N | " + " | ".join(LABELS[m] for m in metric_names) + " |",
                  "|---|---|---|---|" + "---|" * len(metric_names)]
        lines += ["| " + " | ".join(_cell(v) for v in (r["snapshot_name"], r["kimg"], r["label"],
                                                       r["metrics"]["num_samples"], *(r["fmt"][m] for m in metric_names)))
                  + " |" for r in data["rows"]]
    else:
        lines.append("No evaluation has finished yet.")
    for f in data["failures"]:
        lines.append("\n" + _cell(f"FAILED: {f['snapshot_name']} / {f['setting']['name']} after {f['attempts']} "
                                  f"attempts: {f.get('last_error') or 'no error recorded'}"))
    if data["preset"]:
        lines += ["", f"Paper ({data['preset']}, 50k samples): " + "; ".join(
            f"{label}: " + ", ".join(f"{LABELS[k]} {v}" for k, v in vals.items())
            for label, vals in data["published"].items())]
    return html.escape("\n".join(lines) + "\n", quote=False)


def main(argv=None, prog="adm report") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a training run directory with evaluated snapshots")
    p.add_argument("--out", help="directory for report.html/.md/.json (default: the run directory)")
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    if not any((run / name).exists() for name in ("training_options.json", "snapshots", "eval")):
        raise ValueError(f"{run}: not a run directory (no training_options.json, snapshots/ or eval/ in it)")
    if a.out and Path(a.out).exists() and not Path(a.out).is_dir():
        raise ValueError(f"--out {a.out}: a file; expected a directory for report.html, report.md and report.json")
    print(write_report(Path(a.run_dir), Path(a.out) if a.out else None))
    return 0


if __name__ == "__main__":
    from adm.cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:], "python -m eval.report"))
