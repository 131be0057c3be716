"""What an evaluation needs, checked before anything is claimed or queued: each mistake found here
would otherwise surface in a sampling or metrics job, after minutes of work, and use up an attempt.

Only files' headers and JSON are read, and a reference's stored statistics; no network weights are loaded.
"""

from pathlib import Path

from models.config import ModelConfig
from models.respace import space_timesteps
from models.snapshot import CONFIG, SnapshotError, read_config, resolve_weights, verify_snapshot

from .npzfile import describe, open_npz, stored_statistics
from .precision_recall import K_NEAREST
from .settings import EvalSetting


def _snapshot(path: str | Path, role: str, arch: str) -> tuple[ModelConfig, dict]:
    verify_snapshot(path)  # complete, sizes as in its manifest
    meta = read_config(path)
    try:
        config = ModelConfig(**meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{Path(path) / CONFIG}: bad model section: {e}") from None
    if config.arch != arch:
        raise ValueError(f"{path}: a {config.arch} snapshot, expected {role} ({arch})")
    return config, meta


def check_steps(spec: str, meta: dict, what: str, note: str = "") -> None:
    """A respacing against the snapshot's diffusion; the error says which option (`what`) asked for it."""
    steps = meta.get("diffusion", {}).get("steps", 1000)
    try:
        space_timesteps(steps, spec)
    except ValueError as e:
        raise ValueError(f"{what} {spec!r}{note} does not fit the snapshot's {steps}-step diffusion: {e}") from None


def check_guidance_noise(base_meta: dict, classifier_meta: dict, paths: tuple) -> None:
    """The noisy classifier must have been trained on the base model's diffusion: guidance hands it x_t with
    the base model's timestep index t, which means another noise level under another step count or
    schedule (ADM trains each classifier on its base model's). Compared where both snapshots record it."""
    if "diffusion" not in base_meta or "diffusion" not in classifier_meta:
        return

    def noise(meta):
        d = meta["diffusion"]
        return d.get("steps", 1000), d.get("noise_schedule", "linear")

    (b_steps, b_sched), (c_steps, c_sched) = noise(base_meta), noise(classifier_meta)
    if (b_steps, b_sched) != (c_steps, c_sched):
        raise ValueError(f"{paths[1]}: the classifier was trained on a {c_steps}-step {c_sched} diffusion, "
                         f"{paths[0]} on a {b_steps}-step {b_sched} one: its timesteps would mean other noise "
                         "levels; guide with a classifier trained on the base model's diffusion")


def check_stack(base: ModelConfig, classifier: ModelConfig | None, upsampler: ModelConfig | None,
                paths: tuple) -> None:
    """A base model with its classifier and upsampler, before any sampling. Sizes: the classifier guides
    the base model's images, the upsampler takes them as its low resolution. Classes: labels are drawn
    over the base model's classes (or the classifier's, for an unconditional base); a classifier and a
    class-conditional upsampler must know the same classes, or the first seed that draws a label beyond
    theirs fails mid-way."""
    size = base.image_size
    if classifier is not None and classifier.image_size != size:
        raise ValueError(f"{paths[1]}: the classifier reads {classifier.image_size}x{classifier.image_size} images, "
                         f"{paths[0]} samples {size}x{size}; they must be the same size")
    if upsampler is not None and upsampler.small_size != size:
        raise ValueError(f"{paths[2]}: the upsampler takes {upsampler.small_size}x{upsampler.small_size} inputs, "
                         f"{paths[0]} samples {size}x{size}; they must be the same size")
    labels = base.num_classes or (classifier.num_classes if classifier else None)
    for cfg, path, role in ((classifier, paths[1], "classifier"), (upsampler, paths[2], "upsampler")):
        if cfg is None or cfg.num_classes is None:
            continue
        if labels is None:
            raise ValueError(f"{path}: a class-conditional {role} ({cfg.num_classes} classes) after the "
                             f"unconditional {paths[0]}: there are no labels to give it")
        if cfg.num_classes != labels:
            raise ValueError(f"{path}: the {role} has {cfg.num_classes} classes, {paths[0]} samples {labels}; "
                             "they must be the same classes")


def check(snapshot: str | Path, settings: list[EvalSetting], ref: str | Path,
          inception_weights: str | None = None) -> None:
    """Every setting against this snapshot and reference: architectures, weights, step counts,
    resolution, sample count; a clear error naming the setting and file otherwise."""
    ref_info = describe(ref)
    stored_statistics(Path(ref), open_npz(ref), ref_info)  # the values it stores (tens of MB), as the metrics read them
    if ref_info.images and ref_info.images[0] <= K_NEAREST:
        raise ValueError(f"{ref}: arr_0 holds {ref_info.images[0]} images; precision/recall (k={K_NEAREST}) needs "
                         f"more than {K_NEAREST}")
    if inception_weights and not Path(inception_weights).is_file():
        raise FileNotFoundError(f"--inception-weights {inception_weights}: no such file")
    config, meta = _snapshot(snapshot, "a diffusion model", "unet")
    for s in settings:
        try:
            resolve_weights(snapshot, s.weights)
        except SnapshotError as e:
            raise ValueError(f"setting {s.name!r}: {e}") from None  # "SNAP has no weights 'x'; it has ..."
        check_steps(s.steps, meta, f"setting {s.name!r}: steps")
        clf = up = None
        if s.classifier and s.scale:
            clf, clf_meta = _snapshot(s.classifier, "a noisy classifier", "classifier")
            check_guidance_noise(meta, clf_meta, (snapshot, s.classifier))
        size = config.image_size
        if s.upsampler:
            up, up_meta = _snapshot(s.upsampler, "an upsampler", "upsampler")
            check_steps(s.upsampler_steps, up_meta, f"setting {s.name!r}: upsampler_steps")
            size = up.image_size
        check_stack(config, clf, up, (snapshot, s.classifier, s.upsampler))
        if ref_info.images:
            h, w = ref_info.images[1:3]
            if (h, w) != (size, size):
                raise ValueError(f"{ref}: a reference of {h}x{w} images, but setting {s.name!r} samples {size}x{size}"
                                 " (build one at that resolution with `adm eval ref SHARDS --resolution R`)")
            if s.num <= K_NEAREST:
                raise ValueError(f"setting {s.name!r}: num {s.num}; precision/recall against {ref} needs more than "
                                 f"{K_NEAREST} samples")
