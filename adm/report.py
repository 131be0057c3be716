"""The demo's report: loss curves, sample grids and metrics in one HTML page (jinja2 + matplotlib)."""

import base64
import io
from pathlib import Path

import jinja2

TEMPLATE = jinja2.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>ADM at scale: demo report</title>
<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;line-height:1.45}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
img{image-rendering:pixelated}</style></head><body>
<h1>ADM at scale: what the demo did</h1>
<p>The 1,797 handwritten digits that scikit-learn ships were written in ImageNet's folder layout and
converted to WebDataset shards with <code>adm data write</code>. A tiny class-conditional ADM was
trained on them with DeepSpeed ZeRO-2 in two processes; it was interrupted once by the preemption
signal, saved, and resumed exactly where it stopped. A noisy classifier was trained for guidance.
Samples from two snapshots were scored against 200 held-out digits with the real FID Inception
network. On ImageNet on a cluster the same commands do the same:
<code>adm data write /data/imagenet shards/in64 --preprocess center-crop:64</code>, then
<code>adm submit train configs/train/adm-64.yaml --nodes 4 --gpus-per-node 8</code>, then
<code>adm sample</code> and <code>adm eval compare</code> against ADM's reference batch.</p>
<h2>Training loss</h2><img src="data:image/png;base64,{{ curve }}" width="640">
<h2>Metrics (lower FID/sFID is better; higher precision/recall is better)</h2>
<table><tr><th style="text-align:left">snapshot, sampling</th><th>FID</th><th>sFID</th><th>precision</th><th>recall</th></tr>
{% for k, m in metrics.items() %}<tr><td style="text-align:left">{{ k }}</td><td>{{ "%.2f"|format(m.fid) }}</td>
<td>{{ "%.2f"|format(m.sfid) }}</td><td>{{ "%.3f"|format(m.precision) }}</td><td>{{ "%.3f"|format(m.recall) }}</td></tr>{% endfor %}
</table>
<h2>Samples from the EMA weights, by snapshot (one class per column)</h2>
{% for name, g in grids %}<p>{{ name }}<br><img src="data:image/png;base64,{{ g }}" width="256"></p>{% endfor %}
</body></html>""")


def _b64_png(path_or_fig) -> str:
    buf = io.BytesIO()
    if isinstance(path_or_fig, Path):
        return base64.b64encode(path_or_fig.read_bytes()).decode()
    path_or_fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(out: Path, diff_run: Path, clf_run: Path, metrics: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for run, tag, label in ((diff_run, "train/loss", "diffusion (hybrid loss)"),
                            (clf_run, "train/loss", "classifier (cross-entropy)")):
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            ev = acc.Scalars(tag)
            ax.plot([e.step / 1000 for e in ev], [e.value for e in ev], marker="o", label=label)
    ax.set_xlabel("kimg")
    ax.set_ylabel("loss")
    ax.legend()
    curve = _b64_png(fig)
    plt.close(fig)
    grids = [(g.stem, _b64_png(g)) for g in sorted((diff_run / "grids").glob("*.png"))]
    path = out / "report.html"
    path.write_text(TEMPLATE.render(curve=curve, metrics=metrics, grids=grids))
    return path
