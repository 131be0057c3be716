"""What one evaluation is: a sampling setting applied to a snapshot, and the key that names it.

The key covers everything that changes the numbers (snapshot contents, weights, sampler, steps,
guidance, classifier, upsampler, N, seeds, reference, evaluator version) and nothing that does not
(batch size, shard size, worker count: invariant 8), so each (snapshot, setting) is evaluated once.
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# bump when a change moves any metric. 2: the fp16 mode's row sums on a CPU follow TensorFlow's CPU kernel
# (precision/recall in that mode moved by up to 0.001), and the Inception network runs with its batch norms
# folded into the convolutions (features moved by at most 7e-6)
EVALUATOR_VERSION = "adm-eval-2"
MAX_SEED = 2**63
MAX_SHARDS = 100_000
# 2: the upsampler conditioned on uint8 base pixels, as ADM's super_res_sample.py; 3: its noise from a stream of
# its own per seed (models.sampling.upsampler_seed), no longer continuing the base model's
CASCADE_REVISION = 3


@dataclass
class EvalSetting:
    name: str = ""  # short label used in reports and directory names; default: from steps, scale, upsampler
    steps: str = "ddim25"  # timestep respacing: "250" (ancestral), "ddim25" (DDIM), ...
    scale: float = 0.0  # classifier guidance scale; 0 = unguided
    classifier: str | None = None  # noisy classifier snapshot (required when scale > 0)
    upsampler: str | None = None  # upsampler snapshot: evaluate the cascade's output
    upsampler_steps: str = "250"
    weights: str = "ema"  # which weights of the snapshot: ema (first rate), raw, ema_<rate>, phema_<s>
    num: int = 50000  # samples
    seed_start: int = 0  # image i uses seed seed_start + i
    shard_size: int = 1000  # images per sample shard = per task of the sampling and feature arrays
    batch_size: int = 64  # per forward pass (never changes an image)
    pr_distance: str = "fp32"  # precision/recall distance arithmetic: fp32 | fp16 (ADM's)
    precision: str = "fp32"  # sampling arithmetic: fp32 | tf32 (a GPU's TF32) | bf16 (autocast; ADM sampled in fp16)
    every_kimg: float = 0.0  # scheduled passes evaluate the first snapshot at or past each multiple (0: all)
    ref: str | None = None  # this setting's reference batch (a cascade's, at the upsampler's size); default: --ref
    # sample shards kept once the metrics are out: all, or first (the report's samples; 50k images at 256 px
    # are 9.8 GB an evaluation, every snapshot's DDIM-25 terabytes over a run)
    keep_samples: str = "all"

    # which snapshots a pass picks, and against which reference file (the key counts the reference by its content,
    # given apart): not how one is evaluated, never in setting.json's record nor in a key
    SELECTION_ONLY = ("every_kimg", "ref")

    def __post_init__(self):
        self._check_types()
        if not self.name:
            self.name = self.steps + (f"-s{self.scale:g}" if self.scale else "") + ("-cascade" if self.upsampler else "")
        if self.num < 2:
            raise ValueError(f"setting {self.name!r}: num must be >= 2 (covariances need 2 samples), got {self.num}")
        if self.seed_start < 0:
            raise ValueError(f"setting {self.name!r}: seed_start must be 0 or more, got {self.seed_start}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"setting {self.name!r}: shard_size and batch_size must be positive")
        if self.seed_start + self.num > MAX_SEED:  # (a label's generator is seeded with 2 * seed + 1)
            raise ValueError(f"setting {self.name!r}: seeds seed_start .. seed_start + num - 1 must stay below "
                             f"2^63 (torch generators' seeds), got {self.seed_start} + {self.num}")
        if self.num_shards > MAX_SHARDS:  # each a task of the farm's arrays, each planned up front
            raise ValueError(f"setting {self.name!r}: num {self.num} in shards of {self.shard_size} is "
                             f"{self.num_shards} shards, more than {MAX_SHARDS}; raise shard_size (--shard-size) "
                             "or split the seed range (seed_start, --seed-start) over several evaluations")
        if not (math.isfinite(self.every_kimg) and self.every_kimg >= 0):
            raise ValueError(f"setting {self.name!r}: every_kimg must be 0 (every snapshot) or more, got {self.every_kimg}")
        if not math.isfinite(self.scale):
            raise ValueError(f"setting {self.name!r}: scale must be a finite number, got {self.scale}")
        if self.scale and not self.classifier:
            raise ValueError(f"setting {self.name!r}: scale {self.scale} needs a classifier snapshot (classifier=PATH)")
        if self.upsampler_steps != "250" and not self.upsampler:  # (it would still change the evaluation's key)
            raise ValueError(f"setting {self.name!r}: upsampler_steps {self.upsampler_steps!r} needs an upsampler "
                             "snapshot (upsampler=PATH, --upsampler)")
        if self.pr_distance not in ("fp32", "fp16"):
            raise ValueError(f"setting {self.name!r}: pr_distance must be fp32 or fp16, got {self.pr_distance!r}")
        if self.keep_samples not in ("all", "first"):
            raise ValueError(f"setting {self.name!r}: keep_samples must be all or first, got {self.keep_samples!r}")
        if self.precision not in ("fp32", "tf32", "bf16"):
            raise ValueError(f"setting {self.name!r}: precision must be fp32, tf32 or bf16, got {self.precision!r}")
        if not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"setting name {self.name!r}: use letters, digits, '-', '_' and '.' only")

    def _check_types(self):
        """YAML gives strings where numbers were meant (num: many): refused by field, before any use."""
        kinds = {int: ((int,), "an integer"), float: ((int, float), "a number"), str: ((str,), "a string"),
                 str | None: ((str, type(None)), "a path or null")}
        for f in fields(self):
            value = getattr(self, f.name)
            ok, what = kinds[f.type]
            if isinstance(value, bool) or not isinstance(value, ok):
                label = self.name if isinstance(self.name, str) and self.name else "(unnamed)"
                raise ValueError(f"setting {label!r}: {f.name} must be {what}, got {value!r}")
            if f.type is float:
                setattr(self, f.name, float(value))

    def identity(self) -> dict:
        """The fields that say how a snapshot is evaluated (what setting.json records)."""
        return {k: v for k, v in asdict(self).items() if k not in self.SELECTION_ONLY}

    def picks(self, images: list[int]) -> set[int]:
        """Of snapshots' image counts, those a scheduled pass evaluates: with every_kimg, the first count at or
        past each multiple of it (a run's first snapshot included); a function of the counts alone, so a pass
        decides the same as the passes before it."""
        every = self.every_kimg * 1000
        if not every:
            return set(images)
        chosen, mark = set(), 0.0
        for n in sorted(set(images)):
            if n >= mark:
                chosen.add(n)
                mark = (n // every + 1) * every
        return chosen

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_seeds(self, index: int) -> list[int]:
        first = self.seed_start + index * self.shard_size
        return list(range(first, min(first + self.shard_size, self.seed_start + self.num)))


def _digest(path: str | None) -> str | None:
    """Identity of a snapshot (its manifest: every file's sha256) or of a reference file (size + mtime)."""
    if not path:
        return None
    p = Path(path)
    manifest = p / "manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    if p.is_file():
        st = p.stat()
        return f"{p.name}:{st.st_size}:{int(st.st_mtime)}"
    raise FileNotFoundError(f"{p}: no such snapshot or file")


# how the work is cut, and what is kept after it: never an image, never a metric
NUMBERS_UNCHANGED = ("shard_size", "batch_size", "keep_samples")


def numbers_identity(setting: dict) -> str:
    """A recorded setting (setting.json's) as JSON without the fields that change no number: two results
    that differ only in those are one series in the results and the report."""
    return json.dumps({k: v for k, v in setting.items() if k not in NUMBERS_UNCHANGED}, sort_keys=True)


def eval_key(snapshot: str | Path, setting: EvalSetting, ref: str | Path, ref_digest: str | None = None) -> str:
    """<snapshot>--<setting>--<hash of everything that changes the numbers>. The reference counts by its
    content (`ref_digest`: a copy or a touched file is the same reference); without it, by its name,
    size and mtime, as keys were named before."""
    ident = {k: v for k, v in setting.identity().items() if k not in ("name", *NUMBERS_UNCHANGED)}
    if ident["precision"] == "fp32":
        del ident["precision"]  # keys from before the field existed stay valid
    if setting.upsampler:  # cascades now condition on the base samples' uint8 pixels (and ddimN is DDIM):
        ident["cascade"] = CASCADE_REVISION  # their older evaluations are of other samples
    ident.update(classifier=_digest(setting.classifier), upsampler=_digest(setting.upsampler),
                 snapshot=_digest(str(snapshot)), ref=f"sha256:{ref_digest}" if ref_digest else _digest(str(ref)),
                 evaluator=EVALUATOR_VERSION)
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return f"{Path(snapshot).name}--{setting.name}--{h}"


def load_settings(path: str | Path) -> list[EvalSetting]:
    """A YAML list of settings (or {settings: [...]}); each entry's keys are EvalSetting fields."""
    import yaml

    from adm.config import load_yaml, yaml_problem

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such settings file")
    try:  # the configs' YAML: 1.2's plain scalars, a key given twice refused, the error on one line
        data = load_yaml(p)
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not a readable YAML settings file ({yaml_problem(e)})") from None
    if isinstance(data, dict):
        data = data.get("settings")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{p}: expected a list of settings (or settings: [...])")
    known = {f.name for f in fields(EvalSetting)}
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{p}: settings[{i}] must be a mapping")
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{p}: settings[{i}] has unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            out.append(EvalSetting(**entry))
        except ValueError as e:  # its own checks name the setting; the file and the entry say where it is
            raise ValueError(f"{p}: settings[{i}]: {e}") from None
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{p}: setting names must be unique, got {names}")
    return out
