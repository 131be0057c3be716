"""Typed configuration: dataclass schemas, YAML files and dotted `key=value` overrides (OmegaConf).

Every error names the offending key (and file) and says what was expected, before any work starts.
"""

import dataclasses
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the source."""


def _describe(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", None) or err).split("\n")[0]
    where = f"{source}: " if source else ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return f"{where}unknown key '{key}' ({msg})"
    if key and "is not a ListConfig" in msg:  # OmegaConf's words for a single value given to a list field
        return f"{where}bad value for '{key}': expected a list, got a single value (brackets: {key}=[...])"
    if key:
        return f"{where}bad value for '{key}': {msg}"
    return f"{where}{msg}"


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """`a.b=1 c=[1,2]` -> nested dict, values parsed as YAML scalars/lists (YAML 1.2's core schema: see
    _Yaml12Loader)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.load(raw, Loader=_Yaml12Loader) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is set both as a value and as a section")
        node[parts[-1]] = value  # given twice, the later wins (scripts append to a base list of overrides)
    return out


class _Yaml12Loader(yaml.SafeLoader):
    """yaml's safe loader with YAML 1.2's core schema for plain scalars: true/false, decimal integers, decimal
    floats (3e-4 too), null. PyYAML's YAML 1.1 turned strings into other values silently (run_dir=0123 became
    83, 1:30 became 90, 0x1F 31, yes True, 2024-01-01 a date); those stay strings here, and a typed field
    refuses them by name."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float", "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),  # (no leading zeros: 0123 stays a string)
    list("-+.0123456789"))


class _UniqueKeyLoader(_Yaml12Loader):
    """The YAML 1.2 loader, except that a key given twice in one mapping is an error: plain yaml keeps the
    last one silently, so `lr: 1e-4` below an earlier `lr: 3e-4` would quietly override it."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path):
    """A YAML file's contents (duplicate keys refused); yaml.YAMLError names the line. A file that is no
    text (a binary, another encoding) or a directory is a ConfigError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a directory; expected a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
    return yaml.load(text, Loader=_UniqueKeyLoader)


def yaml_problem(e: yaml.YAMLError) -> str:
    """yaml's error on one line: what is wrong, and where (its own message spans several, with excerpts)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = load_yaml(path) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def build(schema: type[T], *layers: tuple[str, dict]) -> T:
    """Merge (source, dict) layers onto the dataclass schema's defaults; validate types and keys.

    Later layers win. Returns a real dataclass instance (its __post_init__ validation runs too).
    """
    merged = OmegaConf.structured(schema)
    for source, data in layers:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(data) if isinstance(data, dict) else data)
        except OmegaConfBaseException as e:
            raise ConfigError(_describe(e, source)) from None
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, "")) from None
    except (ValueError, TypeError) as e:  # raised by the dataclass's own validation
        raise ConfigError(str(e)) from None
    return obj


def load(schema: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         base: dict | None = None) -> T:
    """schema defaults <- base dict <- YAML file <- dotted overrides."""
    layers: list[tuple[str, dict]] = []
    if base:
        layers.append(("preset", base))
    if path is not None:
        layers.append((str(path), read_yaml(path)))
    if overrides:
        layers.append(("command line", parse_overrides(list(overrides))))
    return build(schema, *layers)


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-able dict of a (nested) dataclass config."""
    return dataclasses.asdict(cfg)


def at_least(low: int):
    """argparse type: an integer >= low (argparse then says which flag, and why)."""
    import argparse

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def slurm_mem(text: str) -> str:
    """argparse type: Slurm's --mem (an integer with an optional K/M/G/T unit)."""
    import argparse
    import re

    if not re.fullmatch(r"\d+[KMGT]?", text):
        raise argparse.ArgumentTypeError(f"expected Slurm's form, e.g. 64G or 500M, got {text!r}")
    return text


def check_device(text: str, flag: str = "--device") -> None:
    """A torch device this machine has, or a one-line ValueError naming the flag (before any work; torch
    would otherwise say it half-way through, in its own words)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise ValueError(f"{flag} {text}: not a torch device ({str(e).splitlines()[0]}); e.g. cpu or cuda:0") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {text}: torch sees no CUDA GPU here; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"{flag} {text}: expected cpu or cuda[:N]")


def load_error(e: Exception) -> str:
    """One line for a torch.load that failed: torch's weights-only refusal is paragraphs that advise
    loading the file unsafely, wrong advice for a file that is simply not a tensor checkpoint."""
    import pickle

    if isinstance(e, pickle.UnpicklingError):
        return "unpickling failed: not a PyTorch file of tensors"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
