"""`adm models ...` / `python -m models ...`: list presets, describe a layout, convert checkpoints."""

import argparse
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table


def resolve_config(spec: str, overrides: list[str]):
    """A preset name or a YAML file (which may name a `preset:` to start from), plus key=value overrides."""
    from dataclasses import fields

    from adm.config import ConfigError, load, read_yaml

    from .config import ModelConfig
    from .presets import PRESETS, get_preset

    if spec in PRESETS:
        preset = get_preset(spec)
        return spec, preset, load(ModelConfig, base=preset.model, overrides=overrides)
    if _is_config_file(spec):
        data = read_yaml(spec)
        if "model" in data:  # a model section (a training config's: its other keys are the trainer's)
            top, data = data.get("preset"), data["model"]
            data = {"preset": data} if isinstance(data, str) else data
            if not isinstance(data, dict):
                raise ConfigError(f"{spec}: model: expected a preset's name or a section of model settings, got "
                                  f"{data!r}")
            if "preset" not in data and isinstance(top, str):  # on the training preset's model (the same name)
                data = {"preset": top, **data}
        elif set(data) - {"preset"} - {f.name for f in fields(ModelConfig)}:
            # a training config without a model section: its preset (a training preset) names its model
            data = {"preset": data["preset"]} if isinstance(data.get("preset"), str) else data
        data = dict(data)
        name = data.pop("preset", None)
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{spec}: preset: expected a preset's name, got {name!r}")
        preset = get_preset(name) if name else None
        from adm.config import build, parse_overrides
        layers = [("preset", preset.model)] if preset else []
        layers += [(spec, data), ("command line", parse_overrides(overrides))]
        return name or spec, preset, build(ModelConfig, *layers)
    return spec, get_preset(spec), None  # get_preset raises, naming the known presets


def _is_config_file(spec: str) -> bool:
    """Whether --config/--preset names a YAML file (any existing file, whatever its suffix) rather than a preset."""
    from .presets import PRESETS

    return spec not in PRESETS and (spec.endswith((".yaml", ".yml")) or Path(spec).is_file())


def yaml_diffusion(spec: str | None) -> dict | None:
    """A YAML config's top-level `diffusion:` section ({steps, noise_schedule, predict_xstart}), checked; None
    without one (or for a preset's name)."""
    if not spec or not _is_config_file(spec):
        return None
    from adm.config import read_yaml

    d = read_yaml(spec).get("diffusion")
    if d is None:
        return None
    keys = {"steps", "noise_schedule", "predict_xstart"}
    unknown = sorted(set(d) - keys) if isinstance(d, dict) else ["(not a mapping)"]
    if unknown:
        raise ValueError(f"{spec}: diffusion: {', '.join(unknown)}: a snapshot records {', '.join(sorted(keys))} only")
    out = {"steps": d.get("steps", 1000), "noise_schedule": d.get("noise_schedule", "linear"),
           "predict_xstart": d.get("predict_xstart", False)}
    if out["noise_schedule"] not in ("linear", "cosine") or not (isinstance(out["steps"], int) and out["steps"] > 0) \
            or not isinstance(out["predict_xstart"], bool):
        raise ValueError(f"{spec}: diffusion: expected steps a positive integer, noise_schedule linear or cosine and "
                         f"predict_xstart true or false, got {d}")
    return out


def cmd_list(args) -> int:
    from .config import count_parameters
    from .presets import PRESETS

    table = Table(title="ADM model presets (parameters counted on the meta device)")
    for col in ("preset", "arch", "resolution", "classes", "params", "paper", "description"):
        table.add_column(col, justify="right" if col in ("params", "paper", "classes") else "left")
    for name, p in PRESETS.items():
        cfg = p.config()
        res = f"{cfg.small_size}->{cfg.image_size}" if cfg.arch == "upsampler" else str(cfg.image_size)
        n = count_parameters(cfg)
        table.add_row(name, cfg.arch, res, str(cfg.num_classes or "-"), f"{n / 1e6:.1f}M",
                      f"{p.paper_params_m}M" if p.paper_params_m else "", p.description)
    Console(width=160).print(table)
    return 0


def describe_lines(cfg) -> list[tuple]:
    """(part, resolution, channels, blocks, attention heads, params) per stage of the network."""
    import torch

    from .attention import AttentionBlock
    from .blocks import ResBlock
    from .config import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    rows = []
    res = cfg.image_size

    def stage(name, modules, r):
        blocks = [m for mod in modules for m in mod.modules() if isinstance(m, ResBlock)]
        attns = [m for mod in modules for m in mod.modules() if isinstance(m, AttentionBlock)]
        params = sum(p.numel() for mod in modules for p in mod.parameters())
        convs = [m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Conv2d)]
        ch = blocks[-1].out_layers[-1].out_channels if blocks else convs[-1].out_channels if convs else ""
        heads = f"{len(attns)} x {attns[0].num_heads} heads" if attns else "-"
        rows.append((name, f"{r}x{r}", ch, len(blocks), heads, params))

    per_level_in = cfg.num_res_blocks
    inputs = list(model.input_blocks)
    stage("stem", inputs[:1], res)
    i = 1
    mult = cfg.resolved_channel_mult()
    for level in range(len(mult)):
        n = per_level_in + (1 if level < len(mult) - 1 else 0)
        stage(f"encoder {level}", inputs[i:i + n], res)
        i += n
        res //= 2 if level < len(mult) - 1 else 1
    stage("middle", [model.middle_block], res)
    if hasattr(model, "output_blocks"):
        outs = list(model.output_blocks)
        j = 0
        for level in reversed(range(len(mult))):
            n = cfg.num_res_blocks + 1
            stage(f"decoder {level}", outs[j:j + n], res)
            j += n
            res *= 2 if level else 1
    other = sum(p.numel() for name, mod in model.named_children()
                if name not in ("input_blocks", "middle_block", "output_blocks") for p in mod.parameters())
    rows.append(("embeddings + head", "", "", "", "", other))
    return rows, sum(p.numel() for p in model.parameters())


def cmd_describe(args) -> int:
    name, preset, cfg = resolve_config(args.preset, args.overrides)
    rows, total = describe_lines(cfg)
    console = Console(width=140)
    console.print(f"[bold]{name}[/bold]: {preset.description if preset else 'custom configuration'}")
    whole = lambda mult: [int(m) if float(m).is_integer() else m for m in mult]  # noqa: E731  (1, not 1.0)
    settings = ", ".join(f"{k}={whole(v) if k == 'channel_mult' else v}" for k, v in cfg.to_dict().items())
    console.print(f"config: {settings}")
    console.print(f"channel_mult: {whole(cfg.resolved_channel_mult())}, output channels: {cfg.out_channels}")
    if preset:
        console.print(f"diffusion: {preset.diffusion}")
    table = Table()
    for col in ("stage", "resolution", "channels", "ResBlocks (incl. up/down)", "attention", "params"):
        table.add_column(col, justify="left" if col in ("stage", "resolution", "attention") else "right")
    for r in rows:
        table.add_row(*[str(v) for v in r[:-1]], f"{r[-1]:,}")
    console.print(table)
    paper = f" (paper: {preset.paper_params_m}M)" if preset and preset.paper_params_m else ""
    console.print(f"total parameters: {total:,} = {total / 1e6:.1f}M{paper}")
    return 0


def cmd_convert(args) -> int:
    """ADM .pt -> snapshot directory, or snapshot directory -> ADM .pt."""
    import torch

    from .presets import get_preset
    from .snapshot import WEIGHTS, load_snapshot, save_snapshot
    from .state_dict import check_state_dict, infer_config

    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise ValueError(f"{dst} already exists (pass --overwrite to replace it)")
    if src.exists() and dst.resolve() in (src.resolve(), *src.resolve().parents):
        raise ValueError(f"{dst}: holds the source {src}; writing there would replace what is being converted")
    if src.is_dir() and src.resolve() in dst.resolve().parents:
        raise ValueError(f"{dst}: inside the snapshot {src} (a file there would make it no snapshot any more: "
                         "a later convert --overwrite into it refuses); write it elsewhere")
    if src.is_dir():
        if dst.is_dir():
            raise ValueError(f"{dst}: a directory; a snapshot converts to a .pt file: give its path, e.g. "
                             f"{dst / (src.name + '.pt')}")
        snap = load_snapshot(src, hashes=True)
        weights = snap.ordered()  # proves the weights fit the config before writing anything
        tmp = dst.with_name(f".{dst.name}.partial")
        try:
            torch.save(weights, tmp)
            tmp.replace(dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        print(f"wrote {dst} ({len(snap.state_dict)} tensors, ADM layout) from snapshot {src}")
        return 0
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file or snapshot directory")
    # the options first: reading the file takes a while (several GB for ADM-256)
    if args.preset and args.config:
        raise ValueError("--preset and --config both name the architecture: give one")
    given = args.config or args.preset  # either may name a YAML file, whose diffusion: section counts
    resolved = resolve_config(given, args.overrides) if given else None
    yaml_diffusion(given)  # its diffusion: section checked now too (recorded below)
    try:
        with warnings.catch_warnings():  # torch warns about a file's pickle protocol before refusing it
            warnings.simplefilter("ignore")
            state_dict = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a non-checkpoint file
        from adm.config import load_error
        raise ValueError(f"{src}: not a loadable PyTorch checkpoint ({load_error(e)})") from None
    state_dict = _unwrapped(state_dict, src, args.entry)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        got = type(state_dict).__name__
        if isinstance(state_dict, dict):
            k, v = next((k, v) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
            got = f"a dict whose {k!r} is a {type(v).__name__}" + (
                " (training state? convert a run's snapshot directory instead)" if k in ("ema", "gen", "module") else "")
        raise ValueError(f"{src}: expected a state dict (name -> tensor), got {got}")
    if (odd := next((k for k in state_dict if not isinstance(k, str)), None)) is not None:
        raise ValueError(f"{src}: expected a state dict (name -> tensor), got a key {odd!r} that is not a name")
    if resolved:
        name, preset, cfg = resolved
    else:
        found = infer_config(state_dict)
        if found is None:
            from .config import expected_layout
            from .state_dict import layout_of, mismatches, percent, rank_presets
            actual = layout_of(state_dict)
            ranked = rank_presets(actual)[:3]
            best = ", ".join(f"{n} ({percent(s)} of keys agree)" for n, s in ranked)
            diff = "; ".join(mismatches(expected_layout(get_preset(ranked[0][0]).config()), actual))
            raise ValueError(f"{src}: its layout matches no preset exactly (closest: {best}); against {ranked[0][0]}: "
                             f"{diff}; pass --preset NAME or --config FILE.yaml with the flags it was trained with")
        name, cfg = found
        preset = get_preset(name)
        if cfg.num_classes != preset.config().num_classes:
            print(f"{src}: {name} with {cfg.num_classes} classes (the preset has {preset.config().num_classes})")
        twins = [n for n in same_layout(name) if n != name]
        if twins:
            print(f"{src}: the layout of {name}, and of {', '.join(twins)} too (same shapes, other training): "
                  f"recorded as {name}; pass --preset to say which")
        if args.overrides:  # dropout=0.1 for a fine-tune, say: on top of what the layout told
            from dataclasses import asdict

            from adm.config import build, parse_overrides

            from .config import ModelConfig
            cfg = build(ModelConfig, ("inferred", asdict(cfg)), ("command line", parse_overrides(args.overrides)))
    check_state_dict(state_dict, cfg, source=str(src),
                     described_as=f"{name}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    _check_values(state_dict, src)
    meta = {"preset": name, "source": src.name}
    diffusion = yaml_diffusion(given) or (preset.diffusion if preset else None)
    if diffusion is None:
        diffusion = {"steps": 1000, "noise_schedule": "linear"}
        print(f"{src}: recorded ADM's diffusion, {diffusion} (add a diffusion: section to {given} to say otherwise)")
    meta["diffusion"] = diffusion
    save_snapshot(dst, state_dict, cfg, meta=meta, overwrite=args.overwrite)
    print(f"wrote snapshot {dst} ({WEIGHTS}, config.json, manifest.json) from {src} as {name}")
    return 0


def _unwrapped(obj, src: Path, entry: str | None = None):
    """The state dict inside the usual wrappers: {"ema": ...} (EMA weights, what evaluation uses), then
    {"state_dict": ...}, {"model": ...} or {"model_state_dict": ...} (a training script's save), or the
    `entry` asked for; keys prefixed `module.` by DistributedDataParallel; said when unwrapped."""
    import torch

    def tensors(d):
        return isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values())

    if entry is not None:
        if not isinstance(obj, dict) or not tensors(obj.get(entry)):
            held = ", ".join(repr(k) for k in obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"--entry {entry}: {src} has no state dict under that name (it holds {held})")
        return _unprefixed(obj[entry], src)
    if isinstance(obj, dict) and not tensors(obj):
        inner = next((k for k in ("ema", "state_dict", "model", "model_state_dict") if tensors(obj.get(k))), None)
        if inner is not None:
            if inner != "state_dict":
                others = [k for k, v in obj.items() if k != inner and tensors(v)]
                print(f"{src}: converting its {inner!r} entry (the file holds {', '.join(map(repr, obj))})"
                      + (f"; --entry {others[0]} converts that one instead" if others else ""))
            obj = obj[inner]
    return _unprefixed(obj, src)


def _unprefixed(obj, src: Path):
    import torch

    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj) \
            and all(isinstance(v, torch.Tensor) for v in obj.values()):
        print(f"{src}: keys prefixed 'module.' (a DistributedDataParallel model's): prefix dropped")
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _check_values(state_dict: dict, src: Path) -> None:
    """Weights a snapshot can sample with: floating-point (an integer tensor where a weight belongs would be
    cast and truncated silently), and finite (NaN or inf: a training that diverged; every reader refuses it)."""
    from .snapshot import non_finite

    ints = [k for k, v in state_dict.items() if not v.is_floating_point()]
    if ints:
        raise ValueError(f"{src}: {len(ints)} tensor(s) are not floating-point ({ints[0]} is "
                         f"{state_dict[ints[0]].dtype}): not ADM weights")
    bad = non_finite(state_dict)
    if bad:
        raise ValueError(f"{src}: {bad}: weights of a training that diverged?")


def same_layout(name: str) -> list[str]:
    """Presets whose state dicts have exactly the keys and shapes of this one's (ADM's LSUN models and its
    unconditional 256 model, say)."""
    from .config import expected_layout
    from .presets import PRESETS

    configs = {n: p.config() for n, p in PRESETS.items()}
    mine = configs[name]
    alike = [n for n, c in configs.items() if (c.arch, c.image_size) == (mine.arch, mine.image_size)]
    return [n for n in alike if expected_layout(configs[n]) == expected_layout(mine)]


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="the presets with parameter counts")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("describe", help="the layout of a preset or YAML model config")
    p.add_argument("preset", metavar="PRESET|CONFIG.yaml",
                   help="a preset name (`list` shows them) or a YAML model config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. dropout=0.1")
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser("convert", help="released ADM .pt <-> snapshot (safetensors + config.json)",
                       description="SRC a .pt state dict: write snapshot DST (preset inferred from the layout "
                                   "unless given). SRC a snapshot directory: write the ADM-layout .pt DST.")
    p.add_argument("src", help="a released ADM .pt file, or a snapshot directory")
    p.add_argument("dst", help="the snapshot directory, or the .pt file, to write")
    p.add_argument("--preset", help="the preset the checkpoint was trained as (default: inferred)")
    p.add_argument("--entry", help="a wrapped checkpoint's entry to convert (default: 'ema' where there is one, "
                   "else 'state_dict', 'model' or 'model_state_dict')")
    p.add_argument("--config", help="a YAML model config instead of a preset")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the model config, e.g. "
                   "dropout=0.1")
    p.set_defaults(func=cmd_convert)


def main(argv: list[str] | None = None, prog: str = "python -m models") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="ADM networks: presets, layouts, checkpoint conversion")
    register(parser)
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra  # key=value after an option (--preset NAME dropout=0.1)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
