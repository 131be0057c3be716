"""Snapshots: consolidated weights (safetensors) + resolved config (JSON) + a manifest, committed atomically.

A snapshot is what sampling and evaluation read. It is written into a temporary sibling directory,
the manifest (every file with size and sha256) last, then renamed into place; a directory without a
valid manifest is never taken for a snapshot. This is the one module of `models/` that touches files.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, build_model
from .state_dict import load_checked

FORMAT = "adm-snapshot"
VERSION = 1
WEIGHTS, CONFIG, MANIFEST = "model.safetensors", "config.json", "manifest.json"


class SnapshotError(ValueError):
    """A snapshot directory that is missing, incomplete or corrupt."""


@dataclass
class Snapshot:
    path: Path
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict  # everything in config.json besides the model section

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        model = build_model(self.config)
        load_checked(model, self.state_dict, self.config, source=str(self.path / WEIGHTS),
                     described_as="the model its config.json describes")
        return model.to(device).eval()

    def ordered(self) -> dict[str, torch.Tensor]:
        """The weights in the model's own key order (guided-diffusion's, as in OpenAI's .pt files);
        the snapshot's config must describe them (checked)."""
        return {k: self.state_dict[k] for k in self.build().state_dict()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _usual_modes(directory: Path, names: list[str]) -> None:
    """The modes of a plain mkdir and open under the user's umask (mkdtemp makes 0700, safetensors 0600):
    evaluation jobs and colleagues running as other users must be able to read a snapshot."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in names:
        os.chmod(directory / name, 0o666 & ~umask)


def save_snapshot(directory: str | Path, state_dict: dict[str, torch.Tensor], config: ModelConfig,
                  meta: dict | None = None, overwrite: bool = False,
                  extra_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a snapshot atomically. `meta` (preset, diffusion, training progress, ...) goes to config.json;
    `extra_weights` {name: state dict} are written as `<name>.safetensors` beside (e.g. raw weights)."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise SnapshotError(f"{directory} already exists (pass overwrite=True to replace it)")
    if directory.exists():  # only a snapshot (complete or damaged) is replaced, never a folder of other files
        if not directory.is_dir():
            raise SnapshotError(f"{directory} exists and is a file, not a snapshot; not replaced")
        others = sorted(e.name for e in directory.iterdir()
                        if not (e.is_file() and (e.name in (CONFIG, MANIFEST) or e.name.endswith(".safetensors"))))
        if others:
            raise SnapshotError(f"{directory} exists and is not a snapshot (it holds {', '.join(others[:3])}"
                                + (", ..." if len(others) > 3 else "") + "); not replaced")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        names = [WEIGHTS, CONFIG]
        for name, sd in (extra_weights or {}).items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"),
                      metadata={"format": FORMAT})
            names.append(f"{name}.safetensors")
        _write_json(tmp / CONFIG, {"format": FORMAT, "version": VERSION, **(meta or {}), "model": config.to_dict()})
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in names}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "files": files})
        _usual_modes(tmp, [*names, MANIFEST])
        if directory.exists():  # overwrite: move the old one aside first, so a crash leaves one of the two
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    if directory.is_file():
        raise SnapshotError(f"{directory}: a file, not a snapshot directory" + (
            f"; convert a released checkpoint first: adm models convert {directory} DIR" if directory.suffix in
            (".pt", ".pth", ".bin", ".ckpt") else ""))
    if not directory.is_dir():
        raise SnapshotError(f"snapshot {directory} does not exist or is not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise SnapshotError(f"{directory} is not a complete snapshot: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify_snapshot(directory: str | Path, hashes: bool = False) -> dict:
    """Check every file the manifest lists (size always, sha256 if asked). Returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, info in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise SnapshotError(f"{directory}: {name} is listed in the manifest but missing")
        if f.stat().st_size != info["size"]:
            raise SnapshotError(f"{f}: size {f.stat().st_size} != {info['size']} in the manifest (truncated?)")
        if hashes:
            _check_hash(f, info)
    return manifest


def weight_names(directory: str | Path) -> list[str]:
    """The weights a snapshot holds: "ema" (the main file: the first EMA rate; a classifier's raw weights, as
    config.json's "weights" says) and its extra files ("raw", "ema_<rate>", "phema_<sigma_rel>")."""
    files = read_manifest(directory)["files"]
    return ["ema"] + sorted(n[:-len(".safetensors")] for n in files if n.endswith(".safetensors") and n != WEIGHTS)


def resolve_weights(directory: str | Path, weights: str) -> str:
    """The weights a name means here (one of weight_names): the main file is "ema", also called by its EMA
    rate (`ema_0.9999`, as `ema_rates` lists it). Raises SnapshotError, naming what there is, otherwise."""
    names = weight_names(directory)
    if weights in names:
        return weights
    meta = read_config(directory)
    rate, posthoc = meta.get("ema_rate"), meta.get("posthoc")
    if rate is not None and weights == f"ema_{rate}" and not posthoc:
        return "ema"
    what = (f" (ema is the post-hoc EMA at sigma_rel {posthoc.get('sigma_rel')})" if isinstance(posthoc, dict) else
            f" (ema is the EMA at {rate})" if rate is not None else "")
    raise SnapshotError(f"{directory} has no weights {weights!r}; it has {', '.join(names)}{what}")


def read_config(directory: str | Path) -> dict:
    """config.json, or SnapshotError naming it (not valid JSON, another format, a newer version)."""
    path = Path(directory) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except OSError as e:
        raise SnapshotError(f"{path}: cannot be read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SnapshotError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("version", VERSION) != VERSION:
        raise SnapshotError(f"{path}: snapshot version {meta.get('version')!r}; this tool reads version {VERSION}")
    return meta


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or SnapshotError naming it: unreadable, or holding NaN or infinite values
    (weights that cannot sample; a diverged training's)."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error type, or an OSError
        raise SnapshotError(f"{path}: not a readable safetensors file ({e})") from None
    bad = non_finite(tensors)
    if bad:
        raise SnapshotError(f"{path}: {bad}: these weights cannot sample (a training that diverged?); take an "
                            "earlier snapshot")
    return tensors


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """`N tensor(s) hold NaN or infinite values (names, ...)`, or None when every float tensor is finite."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not bad:
        return None
    more = ", ..." if len(bad) > 3 else ""
    return f"{len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}{more})"


def _check_hash(path: Path, info: dict) -> None:
    if _sha256(path) != info["sha256"]:
        raise SnapshotError(f"{path}: sha256 differs from the manifest (corrupt)")


def load_snapshot(directory: str | Path, hashes: bool = False, weights: str = "ema") -> Snapshot:
    """weights: "ema" (model.safetensors) or the name of an extra weights file (see weight_names).
    hashes: the files read (config and those weights) must match the manifest's sha256 (streamed, about 1 s
    per GB; the weights are then memory-mapped as without it)."""
    directory = Path(directory)
    manifest = verify_snapshot(directory)  # every listed file present, at its size
    weights = resolve_weights(directory, weights)
    files = manifest["files"]
    name = WEIGHTS if weights == "ema" else f"{weights}.safetensors"
    if hashes:
        for checked in (CONFIG, name):
            _check_hash(directory / checked, files[checked])
    meta = read_config(directory)
    try:
        config = ModelConfig(**meta.pop("model"))
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{directory / CONFIG}: bad model section: {e}") from None
    # safetensors stores keys sorted: Snapshot.ordered() gives the model's own (guided-diffusion) order
    tensors = load_weights(directory / name)
    return Snapshot(directory, config, tensors, meta)
