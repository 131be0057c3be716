"""The FID Inception network as plain torch modules, rebuilt from the wheel's TorchScript file.

The TorchScript module computes every conv block as conv2d -> batch norm (no scale, eps 1e-3) -> ReLU
and makes every branch of a mixed block contiguous before concatenating, which defeats channels-last
and costs a copy per branch. Here each block is one conv2d with the batch norm folded into its weight
and bias (w / sqrt(var + eps), beta - mean / sqrt(var + eps), folded in float64), followed by an
in-place ReLU, and tensors stay channels-last throughout. Same function, same weights: the features
agree with the TorchScript module's to float32 rounding (tests/test_eval_metrics.py); on 2 CPU cores
it is 1.7x faster (bench/eval.py measures both).

The graph is read from the module tree, whose layout is fixed by the file (sha1 in eval/inception.py):
`mixed` .. `mixed_8` concatenate their children in order (a child is a conv block, a pool, or a
tower that runs its children in sequence); `mixed_9` and `mixed_10` split their towers in two (the
1x3 and 3x1 convolutions of Inception's last blocks). Pools are the file's own leaf modules.
"""

import torch
import torch.nn.functional as F

EPS = 1e-3  # the batch norms' epsilon in the TF graph


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvBlock(torch.nn.Module):
    """conv2d + batch norm + ReLU of one TF conv block, the batch norm folded into the conv."""

    def __init__(self, block):
        super().__init__()
        w, mean, var, beta = (getattr(block, k).detach().double() for k in ("weight", "mean", "var", "beta"))
        inv = torch.rsqrt(var + EPS)
        self.register_buffer("weight", (w * inv[:, None, None, None]).float())
        self.register_buffer("bias", (beta - mean * inv).float())
        self.stride, self.padding = _pair(block.stride), _pair(block.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding).relu_()


class Tower(torch.nn.Sequential):
    """Children in sequence (also the stem: the layers before the first mixed block)."""


class Concat(torch.nn.Module):
    """Branches applied to the same input, concatenated along channels in the file's order."""

    def __init__(self, branches: list[torch.nn.Module]):
        super().__init__()
        self.branches = torch.nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


class SplitMixed(torch.nn.Module):
    """mixed_9 / mixed_10: a = tower_conv(x), b = tower_1_conv_1(tower_1_conv(x)); the output is
    [conv(x), tower_mixed_conv(a), tower_mixed_conv_1(a), tower_1_mixed_conv(b), tower_1_mixed_conv_1(b),
    tower_2_conv(tower_2_pool(x))] concatenated, as in the file's forward."""

    def __init__(self, block):
        super().__init__()
        for name, child in block.named_children():
            setattr(self, name, port(child))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


SPLIT_CHILDREN = {"conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1",
                  "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_pool", "tower_2_conv"}


def port(module, name: str = "") -> torch.nn.Module:
    """One node of the TorchScript tree as a plain module."""
    children = list(module.named_children())
    if not children:
        return ConvBlock(module) if hasattr(module, "weight") else module  # a pool: the file's own leaf
    if {n for n, _ in children} == SPLIT_CHILDREN:
        return SplitMixed(module)
    if name.startswith("mixed"):
        return Concat([port(c, n) for n, c in children])
    return Tower(*[port(c, n) for n, c in children])


def layers_of(scripted_layers) -> dict[str, torch.nn.Module]:
    """The top-level layers (conv, ..., mixed_10, pool2) by name, in order."""
    out = {name: port(child, name) for name, child in scripted_layers.named_children()}
    if "mixed_6" not in out or not isinstance(out["mixed_6"], Concat) or "pool2" not in out:
        raise ValueError("the Inception file's layout is not the FID graph's (expected mixed_6 and pool2)")
    return out
