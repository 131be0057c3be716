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
    # YAML 1.2's plain scalars: PyYAML's 1.1 turned these strings into numbers, booleans and dates silently
    assert parse_overrides(["a=0123", "b=1:30", "c=0x1F", "d=yes", "e=2024-01-01", "f=007"]) == {
        "a": "0123", "b": "1:30", "c": "0x1F", "d": "yes", "e": "2024-01-01", "f": "007"}
    assert parse_overrides(["a=1e-4", "b=3E-4", "c=-.5", "d=1.", "e=true", "f=False", "g=~", "h=.inf"]) == {
        "a": 1e-4, "b": 3e-4, "c": -0.5, "d": 1.0, "e": True, "f": False, "g": None, "h": float("inf")}
    assert parse_overrides(["a.b=1", "a.b=2"]) == {"a": {"b": 2}}  # the later wins, as scripts that append expect


def test_strings_stay_strings_and_numbers_are_checked(tmp_path):
    """A text field keeps what was typed (run_dir=0123 was 83); a number field refuses 1:30 (it was 90.0); a
    file reads the same way; tagged values (!!binary) and a preset that is not a name are refused by name."""
    from trainer.config import load_train_config

    assert load_train_config(None, ["preset=tiny-32", "run_dir=0123", "data=2024-01-01"]).run_dir == "0123"
    with pytest.raises(ConfigError, match="lr"):
        load_train_config(None, ["preset=tiny-32", "lr=1:30"])
    (tmp_path / "a.yaml").write_text("preset: tiny-32\nrun_dir: 0x1F\nlr: 3e-4\n")
    cfg = load_train_config(str(tmp_path / "a.yaml"))
    assert (cfg.run_dir, cfg.lr) == ("0x1F", 3e-4)
    for overrides, expected in [(["preset=[a]"], "preset: expected a training preset's name, got ['a']"),
                                (["preset=tiny-32", "diffusion=cosine"], "diffusion: expected a section"),
                                (["model.preset=[1]"], "model.preset: expected a model preset's name")]:
        with pytest.raises(ValueError, match=re.escape(expected)):
            load_train_config(None, overrides)
    (tmp_path / "b.yaml").write_text("preset: tiny-32\nlr: !!binary aGVsbG8=\n")
    with pytest.raises(ValueError, match="lr: a bytes value"):
        load_train_config(str(tmp_path / "b.yaml"))


def test_a_bad_command_line_value_is_named_as_the_command_lines(tmp_path):
    """With a mistake in the file too, a bad value typed on the command line was blamed on the file."""
    from trainer.config import load_train_config

    (tmp_path / "typo.yaml").write_text("preset: tiny-32\nbatchh: 3\n")
    for override, key in (("lr=abc", "lr"), ("model.dropout=abc", "model.dropout")):
        with pytest.raises(ConfigError, match=re.escape(f"command line: bad value for '{key}'")):
            load_train_config(str(tmp_path / "typo.yaml"), [override])
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'typo.yaml'}: unknown key 'batchh'")):
        load_train_config(str(tmp_path / "typo.yaml"), ["lr=0.1"])


def test_a_file_naming_a_model_preset_keeps_it_under_model_overrides(tmp_path):
    """`model: tiny-32` in the file and model.dropout=0.1 on the command line: tiny-32 with that dropout (the
    override replaced the preset's name, leaving the default 64x64 model)."""
    from trainer.config import load_train_config

    (tmp_path / "m.yaml").write_text("model: tiny-32\n")
    cfg = load_train_config(str(tmp_path / "m.yaml"), ["model.dropout=0.1"])
    assert (cfg.model.model_channels, cfg.model.image_size, cfg.model.dropout, cfg.diffusion.noise_schedule) == (
        32, 32, 0.1, "cosine")


def test_attention_heads_that_do_not_divide_are_refused_by_the_config():
    """Before any job is submitted or process started (the network's own check came on every rank, after
    DeepSpeed started): the width of every attention layer, encoder, middle, decoder and pool."""
    from models.presets import PRESETS

    for name, preset in PRESETS.items():  # every published layout passes
        preset.config()
    with pytest.raises(ValueError, match="model.num_head_channels: attention with 64 channels is not divisible by "
                                         "num_head_channels=7"):
        ModelConfig(image_size=32, model_channels=32, channel_mult=[1, 2, 2], attention_resolutions=[8],
                    num_head_channels=7)
    with pytest.raises(ValueError, match="model.num_heads_upsample: num_heads=3"):
        ModelConfig(image_size=32, model_channels=32, channel_mult=[1, 2, 2], attention_resolutions=[8],
                    num_heads=4, num_heads_upsample=3)
    with pytest.raises(ValueError, match="model.num_heads: num_heads=3"):  # the middle block's, no attention levels
        ModelConfig(image_size=32, model_channels=32, channel_mult=[1, 2, 2], attention_resolutions=[], num_heads=3)


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


def test_a_settings_file_reads_like_the_configs_and_names_the_entry(tmp_path):
    """Evaluation settings: YAML 1.2's scalars and duplicate keys refused on one line, as the configs (it
    was OmegaConf's loader: a multi-line error); an entry's own mistake names the file and its index."""
    from eval.settings import load_settings

    f = tmp_path / "s.yaml"
    f.write_text("- name: a\n  steps: ddim25\n- name: b\n  num: many\n")
    with pytest.raises(ValueError, match=re.escape(f"{f}: settings[1]: setting 'b': num must be an integer, got 'many'")):
        load_settings(f)
    f.write_text("- name: a\n  name: b\n")
    with pytest.raises(ValueError, match=r"not a readable YAML settings file \(found duplicate key 'name' \(line 2, "
                                         r"column 3\)\)$"):
        load_settings(f)
    f.write_text("- name: a\n  steps: ddim25\n  num: 100\n  every_kimg: 0x10\n")
    with pytest.raises(ValueError, match=re.escape("settings[0]: setting 'a': every_kimg must be")):
        load_settings(f)
