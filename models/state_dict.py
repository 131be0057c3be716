"""Checking a state dict against a model layout, with errors that say what would fit."""

import math
from collections.abc import Mapping

import torch
from torch import nn

from .config import ModelConfig, expected_layout


class CheckpointMismatch(ValueError):
    """A state dict that does not fit the model it is loaded into."""


def layout_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def compare_layouts(expected: Mapping[str, tuple], actual: Mapping[str, tuple]):
    """(missing, unexpected, wrong_shape) key lists, in the expected/actual key order."""
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    wrong = [k for k in expected if k in actual and tuple(expected[k]) != tuple(actual[k])]
    return missing, unexpected, wrong


def rank_presets(actual: Mapping[str, tuple]) -> list[tuple[str, float]]:
    """Presets ordered by how well their layout fits `actual` (1.0 = exact), best first."""
    from .presets import PRESETS  # local: presets import config, which this module also uses

    scores = []
    for name, preset in PRESETS.items():
        exp = expected_layout(preset.config())
        same = sum(1 for k, s in exp.items() if actual.get(k) == s)
        scores.append((name, same / max(len(exp), len(actual))))
    return sorted(scores, key=lambda s: -s[1])


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, ModelConfig] | None:
    """(preset, config) whose layout the state dict has exactly: a preset as it is, or a class-conditional
    preset with another class count (a model trained or fine-tuned on other data), read off the shapes of
    the class-dependent tensors (the label embedding, a classifier's output layer)."""
    from dataclasses import replace

    from .presets import get_preset

    actual = layout_of(state_dict)
    for name, _ in rank_presets(actual)[:3]:
        cfg = get_preset(name).config()
        if expected_layout(cfg) == actual:
            return name, cfg
        if cfg.num_classes is None:
            continue
        base, other = expected_layout(cfg), expected_layout(replace(cfg, num_classes=cfg.num_classes + 1))
        key = next((k for k in base if other.get(k) != base[k]), None)
        if key is None or key not in actual or len(actual[key]) != len(base[key]):
            continue
        dim = next(i for i, (a, b) in enumerate(zip(base[key], other[key])) if a != b)
        guess = replace(cfg, num_classes=actual[key][dim])
        if expected_layout(guess) == actual:
            return name, guess
    return None


def _first(keys, shapes_exp=None, shapes_act=None, n=5):
    out = []
    for k in keys[:n]:
        if shapes_exp is not None:
            out.append(f"{k} (checkpoint {list(shapes_act[k])}, model {list(shapes_exp[k])})")
        else:
            out.append(k)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(out) + more


def check_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "checkpoint",
                     described_as: str = "the model", expected: Mapping[str, tuple] | None = None) -> None:
    """Raise CheckpointMismatch, listing the first differences and the presets that would fit.
    expected: cfg's layout when already known (from a built model); otherwise built on the meta device."""
    expected = expected_layout(cfg) if expected is None else expected
    actual = layout_of(state_dict)
    differences = mismatches(expected, actual)
    if not differences:
        return
    lines = [f"{source} does not fit {described_as}:", *(f"  {d}" for d in differences)]
    ranked = rank_presets(actual)
    exact = [n for n, s in ranked if s == 1.0]
    if exact:
        lines.append(f"  it is exactly the layout of preset {', '.join(exact)}: use --preset {exact[0]}")
    elif ranked:
        lines.append("  closest presets: " + ", ".join(f"{n} ({percent(s)} of keys agree)" for n, s in ranked[:3]))
    raise CheckpointMismatch("\n".join(lines))


def percent(share: float) -> str:
    """Rounded down: 306 of 307 keys is 99.6%, never "100%"."""
    return f"{math.floor(share * 1000) / 10:g}%"


def mismatches(expected: Mapping[str, tuple], actual: Mapping[str, tuple]) -> list[str]:
    """The differences of two layouts, one line per kind (the first few keys of each)."""
    missing, unexpected, wrong = compare_layouts(expected, actual)
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {_first(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {_first(unexpected)}")
    if wrong:
        lines.append(f"shape mismatches ({len(wrong)}): {_first(wrong, expected, actual)}")
    return lines


def load_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig,
                 source: str = "checkpoint", described_as: str = "the model") -> nn.Module:
    check_state_dict(state_dict, cfg, source, described_as, expected=layout_of(model.state_dict()))
    model.load_state_dict(state_dict, strict=True)
    return model
