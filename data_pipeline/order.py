"""The global sample order: a pure function of (seed, epoch, shard list, canonical slot count).

Epoch e permutes the shards with a generator seeded by (seed, e); shard j of that permutation goes
to slot j mod S. Each slot reads its shards whole, in that order, visiting each shard's samples in a
permutation seeded by (seed, e, shard) (a shuffle over the full shard, exactly resumable). Every
sample has a position (slot, epoch, j, offset): its slot, the epoch, the index of its shard in the
slot's list for that epoch, and its index in that shard's permutation.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    shard: int = 0  # index into the slot's shard list for this epoch
    offset: int = 0  # index into that shard's sample permutation


class Order:
    def __init__(self, shard_counts: list[int], num_slots: int, seed: int):
        if num_slots <= 0:
            raise ValueError(f"canonical slot count must be positive, got {num_slots}")
        if num_slots > len(shard_counts):
            raise ValueError(f"{num_slots} canonical slots but only {len(shard_counts)} shards: every slot needs at "
                             "least one shard per epoch (write smaller shards or use fewer slots)")
        self.counts = list(shard_counts)
        self.num_slots = num_slots
        self.seed = seed
        self._epoch_perm: tuple[int, list[int]] | None = None  # the current epoch's, cached

    def shards_of(self, slot: int, epoch: int) -> list[int]:
        if self._epoch_perm is None or self._epoch_perm[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
            self._epoch_perm = (epoch, [int(s) for s in perm])
        return self._epoch_perm[1][slot::self.num_slots]

    def sample_order(self, shard: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard, 1]).permutation(self.counts[shard])

    def advance(self, slot: int, pos: Position) -> Position:
        """The position after `pos` in the slot's stream (rolling over shards and epochs)."""
        shards = self.shards_of(slot, pos.epoch)
        if pos.offset + 1 < self.counts[shards[pos.shard]]:
            return Position(pos.epoch, pos.shard, pos.offset + 1)
        if pos.shard + 1 < len(shards):
            return Position(pos.epoch, pos.shard + 1, 0)
        return Position(pos.epoch + 1, 0, 0)
