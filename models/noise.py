"""Where sampling noise comes from: the global RNG, one torch.Generator, or one seed per sample.

PerSampleNoise makes image i a function of (weights, seed i, settings) only: every draw for sample i
comes from its own generator, so batch size, device count and order never change an image.
"""

from collections.abc import Sequence

import torch


class PerSampleNoise:
    """One generator per sample; `randn(shape)` stacks each sample's own draw along dim 0."""

    def __init__(self, seeds: Sequence[int], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"a batch of {shape[0]} needs as many seeds, got {len(self.generators)}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample (e.g. a class label), from the sample's generator."""
        return torch.cat([torch.randint(high, (1,), generator=g, device=self.device) for g in self.generators])


def randn_for(like: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, from the given source."""
    if generator is None:
        return torch.randn_like(like)
    if isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    return generator.randn(like.shape, dtype=like.dtype).to(like.device)
