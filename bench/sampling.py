"""Sampling throughput, ours against guided-diffusion's, same weights and settings.

250-step ancestral (respacing "250") and 25-step DDIM ("ddim25"), with and without classifier
guidance; tiny presets on CPU, ADM-64/128/256 on a GPU. Images/s = batch / wall time of a full loop;
ours and the reference alternate, medians of `--rounds`.

    .venv/bin/python bench/sampling.py --out bench/out/sampling-cpu.json
    .venv/bin/python bench/sampling.py --device cuda --out bench/out/sampling-gpu.json
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_device_args, resolve, save_partial, write_result  # noqa: E402
from bench.models import reference_model  # noqa: E402
from models.adm_compat import diffusion_from_preset  # noqa: E402
from models.config import ModelConfig, build_model  # noqa: E402
from models.guidance import classifier_cond_fn  # noqa: E402
from models.presets import get_preset  # noqa: E402

# (label, diffusion preset, classifier preset, batch on CPU, batch on GPU)
CPU_CASES = [("tiny-32", "tiny-32", "tiny-classifier-32", 16, 256)]
GPU_CASES = CPU_CASES + [("adm-64", "adm-64", "classifier-64", None, 64),
                         ("adm-128", "adm-128", "classifier-128", None, 32),
                         ("adm-256", "adm-256", "classifier-256", None, 16)]
SETTINGS = [("ancestral-250", "250", False), ("ddim-25", "ddim25", True)]
# on a GPU, 250 ancestral steps of ADM-128/256 take minutes for ours and the reference together: DDIM only there
GPU_ANCESTRAL = ("tiny-32", "adm-64")


def reference_diffusion(preset, respacing):
    from guided_diffusion import script_util as gd

    return gd.create_gaussian_diffusion(steps=preset.diffusion["steps"], learn_sigma=preset.config().learn_sigma,
                                        noise_schedule=preset.diffusion["noise_schedule"],
                                        timestep_respacing=respacing)


def reference_cond_fn(classifier, scale):
    def cond_fn(x, t, y=None):  # as guided-diffusion's classifier_sample.py
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            return torch.autograd.grad(log_probs[range(len(log_probs)), y.view(-1)].sum(), x_in)[0] * scale
    return cond_fn


def load_case(preset_name, clf_name, batch, device, dtype):
    """A case's models (ours and the reference, same weights; their classifiers), on the device, warmed up."""
    preset, clf_preset = get_preset(preset_name), get_preset(clf_name)
    cfg = ModelConfig(**{**preset.model, "dropout": 0.0})
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    ref = reference_model(cfg).eval()
    ref.load_state_dict(ours.state_dict())
    clf = build_model(clf_preset.config()).eval()
    ref_clf = reference_model(clf_preset.config()).eval()
    ref_clf.load_state_dict(clf.state_dict())
    # ours runs channels-last (its recommended setting); the reference as shipped
    ours = ours.to(device, memory_format=torch.channels_last)
    clf = clf.to(device, memory_format=torch.channels_last)
    ref, ref_clf = ref.to(device), ref_clf.to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    shape = (batch, 3, cfg.image_size, cfg.image_size)
    if device.type == "cuda":  # cuDNN's algorithm search at these shapes, before any timed loop
        x, t = torch.randn(shape, device=device), torch.zeros(batch, dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                ours(x, t, y=y), ref(x, t, y=y)
            for c in (clf, ref_clf):
                c(x.requires_grad_(True), t).sum().backward()
    return preset, cfg, ours, ref, clf, ref_clf, y, shape


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    device, dtype, cases = resolve(a, CPU_CASES, GPU_CASES)
    rows = []
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    # on a GPU every model's DDIM rows first, then the ancestral ones (minutes each): a time limit then costs
    # the slow rows, not the larger models' DDIM ones
    if device.type == "cuda":
        jobs = [(case, st) for st in sorted(SETTINGS, key=lambda st: not st[2]) for case in cases
                if st[2] or case[0] in GPU_ANCESTRAL]
    else:
        jobs = [(case, st) for case in cases for st in SETTINGS]
    loaded = None
    for (label, preset_name, clf_name, batch), (setting, respacing, ddim) in jobs:
        if loaded is None or loaded[0] != label:
            loaded = None  # the last case's models freed before the next one's load
            if device.type == "cuda":
                torch.cuda.empty_cache()
            loaded = (label, *load_case(preset_name, clf_name, batch, device, dtype))
        _, preset, cfg, ours, ref, clf, ref_clf, y, shape = loaded
        diff, ref_diff = diffusion_from_preset(preset.diffusion, cfg.learn_sigma, respacing), \
            reference_diffusion(preset, respacing)
        for guided in (False, True):
            runs = {
                "ours": lambda: (diff.ddim_sample_loop if ddim else diff.p_sample_loop)(
                    ours, shape, model_kwargs={"y": y}, device=device,
                    cond_fn=classifier_cond_fn(clf, 1.0) if guided else None),
                "reference": lambda: (ref_diff.ddim_sample_loop if ddim else ref_diff.p_sample_loop)(
                    ref, shape, model_kwargs={"y": y}, device=device,
                    cond_fn=reference_cond_fn(ref_clf, 1.0) if guided else None),
            }
            times = {k: [] for k in runs}
            for _ in range(a.rounds):
                for k, run in runs.items():
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        run()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times[k].append(time.perf_counter() - start)
            row = {"case": label, "setting": setting, "guided": guided, "batch": batch,
                   **{f"{k}_img_s": batch / statistics.median(v) for k, v in times.items()}}
            row["speedup"] = row["ours_img_s"] / row["reference_img_s"]
            rows.append(row)
            save_partial(result, a.out)
            print(f"{label:<10} {setting:<14} guided={guided!s:<5} ours {row['ours_img_s']:8.2f} img/s  "
                  f"reference {row['reference_img_s']:8.2f} img/s  x{row['speedup']:.2f}", flush=True)
    write_result(result, a.out)


if __name__ == "__main__":
    main()
