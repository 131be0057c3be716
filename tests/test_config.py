"""Typed configuration: YAML presets, dotted overrides, and errors that name the key."""

import dataclasses
import re

import pytest

from adm.config import ConfigError, load, parse_overrides
from models.cli import resolve_config
from models.config import ModelConfig


@dataclasses.dataclass
class Optim:
    lr: float = 1e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])


@dataclasses.dataclass
class Run:
    name: str = "run"
    steps: int = 10
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("name: big\noptim:\n  lr: 3.0e-4\n")
    cfg = load(Run, f, ["steps=20", "optim.betas=[0.9,0.99]"])
    assert isinstance(cfg, Run) and isinstance(cfg.optim, Optim)
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("big", 20, 3e-4, [0.9, 0.99])


@pytest.mark.parametrize("overrides,match", [
    (["optim.momentum=0.9"], "unknown key 'optim.momentum'"),
    (["stepz=3"], "unknown key 'stepz'"),
    (["steps=many"], "bad value for 'steps'"),
    (["optim.lr=fast"], "bad value for 'optim.lr'"),
    (["optim.betas=[0.9,x]"], r"bad value for 'optim.betas\[1\]'"),
    (["steps"], "not of the form key=value"),
    (["optim.betas=0.9"], re.escape("bad value for 'optim.betas': expected a list, got a single value (brackets: "
                                    "optim.betas=[...])")),
])
def test_override_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load(Run, overrides=overrides)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-4\n  warmup: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optim.warmup'"):
        load(Run, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load(Run, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load(Run, tmp_path / "list.yaml")
    # a key given twice: plain yaml keeps the last silently (the first lr would be quietly overridden)
    (tmp_path / "twice.yaml").write_text("optim:\n  lr: 3e-4\n  betas: [0.9, 0.99]\n  lr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: found duplicate key 'lr' \(line 4, column 3\)$"):
        load(Run, tmp_path / "twice.yaml")
    (tmp_path / "twice.yaml").write_text("optim:\n  lr: 3e-4\noptim:\n  betas: [0.9, 0.99]\n")
    with pytest.raises(ConfigError, match=r"found duplicate key 'optim'"):
        load(Run, tmp_path / "twice.yaml")


def test_parse_overrides_nests_and_types():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2.5]", "e=null"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2.5],
                                                                          "e": None}


def test_model_yaml_starts_from_a_preset(tmp_path):
    f = tmp_path / "model.yaml"
    f.write_text("model:\n  preset: adm-64\n  dropout: 0.0\n  use_checkpoint: true\n")
    name, preset, cfg = resolve_config(str(f), ["num_classes=null"])
    assert name == "adm-64" and preset.name == "adm-64"
    assert (cfg.model_channels, cfg.dropout, cfg.use_checkpoint, cfg.num_classes) == (192, 0.0, True, None)
    name, _, cfg = resolve_config("tiny-32", ["model_channels=64"])
    assert isinstance(cfg, ModelConfig) and cfg.model_channels == 64
    with pytest.raises(ConfigError, match="unknown key 'channels'"):
        resolve_config("tiny-32", ["channels=64"])
    with pytest.raises(ConfigError, match="model.model_channels: .*multiple of 32"):
        resolve_config("tiny-32", ["model_channels=40"])


def test_configs_shipped_in_the_repository_load():
    from conftest import REPO
    files = sorted((REPO / "configs" / "models").glob("*.yaml"))
    assert files, "configs/models holds example model configs"
    for f in files:
        resolve_config(str(f), [])
