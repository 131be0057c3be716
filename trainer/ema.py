"""EMA of the fp32 master weights, on each rank's own shard: no communication per step.

Under ZeRO-1/2 this rank's master partition is `engine.optimizer.single_partition_of_fp32_groups`
(flat, one tensor per parameter group); under ZeRO-3, `safe_get_local_fp32_param(p)` per parameter.
Consolidation (for snapshots) all-gathers the flat shards and cuts them into parameters with a layout
read from the optimizer (`layout`); checkpoints store only each rank's shards plus that layout, so a
resume at another world size assembles the full EMA from the old rank files without any collective at
save time. There each rank copies its new shards straight from the old ones, a parameter's piece at a time
(`load_resharded`), so no rank ever holds a full EMA.
"""

import math

import torch


class ShardEMA:
    def __init__(self, engine, rates: list[float], zero_stage: int, power_sigma_rels: list[float] = ()):
        from .power_ema import PowerEMA

        self.engine, self.rates, self.stage = engine, list(rates), zero_stage
        self._masters = None
        self.shadows = {rate: [m.detach().clone() for m in self.masters()] for rate in self.rates}
        self.updates = 0
        self.power = PowerEMA(self.masters(), list(power_sigma_rels)) if power_sigma_rels else None

    def masters(self) -> list[torch.Tensor]:
        if self.stage != 3:
            return list(self.engine.optimizer.single_partition_of_fp32_groups)
        if self._masters is None:
            # views into DeepSpeed's flat fp32 partitions, which its optimizer updates in place: fetched once,
            # since each fetch waits for DeepSpeed's reduce stream on a GPU (one sync per parameter per step);
            # detached, as autograd forbids using a view kept across in-place updates of its base
            from deepspeed.utils import safe_get_local_fp32_param

            self._masters = [safe_get_local_fp32_param(p).detach() for p in self.engine.module.parameters()]
        return self._masters

    def refresh(self) -> None:
        """After DeepSpeed loaded a checkpoint: fetch the master views again (it may have rebuilt them)."""
        self._masters = None

    @torch.no_grad()
    def update(self) -> None:
        """ema <- rate * ema + (1 - rate) * weights; call only after a step that was taken."""
        masters = self.masters()
        for rate, shadow in self.shadows.items():
            torch._foreach_lerp_(shadow, masters, 1.0 - rate)
        if self.power is not None:
            self.power.update(masters)
        self.updates += 1

    def all_shadows(self) -> dict[str, list[torch.Tensor]]:
        """name -> shards: "ema_<rate>" and, with power EMA, "phema_<sigma_rel>"."""
        out = {f"ema_{r}": s for r, s in self.shadows.items()}
        if self.power is not None:
            out.update({f"phema_{s}": v for s, v in self.power.shadows.items()})
        return out

    def state_dict(self) -> dict:
        """This rank's shards (no copies: torch.save serialises them at once)."""
        return {"rates": self.rates, "updates": self.updates,
                "shadows": {str(r): list(s) for r, s in self.shadows.items()},
                "power": self.power.state_dict() if self.power is not None else None}

    @staticmethod
    def shards_of(state: dict) -> dict[str, list[torch.Tensor]]:
        """A saved state_dict's shards by name, as in all_shadows()."""
        out = {f"ema_{float(r)}": s for r, s in state["shadows"].items()}
        if state.get("power"):
            out.update({f"phema_{float(s)}": v for s, v in state["power"]["shadows"].items()})
        return out

    def layout(self) -> dict:
        """Where every parameter lives in the rank shards (identical on every rank), so that full weights can
        be assembled from the shards of all ranks: by a collective here, or from the saved rank files."""
        named = list(self.engine.module.named_parameters())
        if self.stage == 3:  # each parameter split evenly over the ranks (padded): shard i of every rank
            return {"stage": 3, "params": [[n, list(p.ds_shape), [i]] for i, (n, p) in enumerate(named)]}
        opt, where = self.engine.optimizer, {}  # one flat buffer per group, partitioned evenly over the ranks
        for g, flat in enumerate(opt.bit16_groups_flat):
            for p in opt.bit16_groups[g]:
                where[id(p)] = [g, (p.data_ptr() - flat.data_ptr()) // flat.element_size()]
        return {"stage": self.stage, "params": [[n, list(p.shape), where[id(p)]] for n, p in named]}

    @staticmethod
    def _place(layout: dict, entry: list) -> tuple[int, int, int]:
        """(flat buffer, offset in it, length) of one layout entry. ZeRO-1/2 pack a group's parameters into one
        flat buffer; ZeRO-3 gives each parameter its own (padded) one. Either buffer is split over the ranks in
        equal consecutive shards."""
        _, shape, where = entry
        return (where[0], 0, math.prod(shape)) if layout["stage"] == 3 else (where[0], where[1], math.prod(shape))

    @staticmethod
    def _read(per_rank: list[list[torch.Tensor]], buffer: int, a: int, b: int) -> torch.Tensor:
        """Elements [a, b) of a flat buffer from the shards of every rank (rank order), touching only those
        ranks' shards that hold a part of it."""
        size = per_rank[0][buffer].numel()
        pieces = [per_rank[r][buffer].reshape(-1)[max(a - r * size, 0):min(b - r * size, size)]
                  for r in range(a // size, (b - 1) // size + 1)] if b > a else [per_rank[0][buffer].new_empty(0)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    @classmethod
    def assemble(cls, layout: dict, per_rank: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Full fp32 state dict from the shards of every rank, in rank order."""
        out = {}
        for entry in layout["params"]:
            buffer, offset, n = cls._place(layout, entry)
            out[entry[0]] = cls._read(per_rank, buffer, offset, offset + n).view(entry[1]).to("cpu", copy=True)
        return out

    @classmethod
    @torch.no_grad()
    def reshard(cls, old_layout: dict, old: list[list[torch.Tensor]], layout: dict, rank: int,
                mine: list[torch.Tensor]) -> None:
        """Fill this rank's shards `mine` (under `layout`, this world size) from the shards every rank of
        another world size saved (`old`, rank order, under `old_layout`): parameters matched by name, each
        copied only where it overlaps this rank's part of its buffer, padding zeroed. Neither side needs to
        hold a full copy."""
        where = {entry[0]: cls._place(old_layout, entry) for entry in old_layout["params"]}
        for t in mine:
            t.zero_()
        for entry in layout["params"]:
            buffer, offset, n = cls._place(layout, entry)
            size = mine[buffer].numel()
            lo, hi = max(offset, rank * size), min(offset + n, (rank + 1) * size)
            if lo >= hi:
                continue
            if entry[0] not in where:
                raise ValueError(f"parameter {entry[0]} has no EMA in the checkpoint")
            old_buffer, old_offset, old_n = where[entry[0]]
            if old_n != n:
                raise ValueError(f"parameter {entry[0]} has {old_n} elements in the checkpoint's EMA, not {n}")
            piece = cls._read(old, old_buffer, old_offset + lo - offset, old_offset + hi - offset)
            mine[buffer].view(-1)[lo - rank * size:hi - rank * size].copy_(piece)

    def load_state_dict(self, state: dict) -> None:
        if [float(r) for r in state["rates"]] != self.rates:
            raise ValueError(f"checkpoint EMA rates {state['rates']} differ from the config's {self.rates}")
        for r, tensors in state["shadows"].items():
            for dst, src in zip(self.shadows[float(r)], tensors):
                dst.copy_(src)
        self.updates = state["updates"]
        if self.power is not None:
            if not state.get("power"):
                raise ValueError("the checkpoint has no power-function EMA; it cannot be switched on in a resume")
            self.power.load_state_dict(state["power"])

    @torch.no_grad()
    def full_state_dicts(self, include_raw: bool = True, dst: int = 0) -> dict[str, dict]:
        """{"raw": ..., "ema_<rate>": ..., "phema_<sigma_rel>": ...} full fp32 state dicts (on the CPU) on rank
        `dst`, {} on the others (collective: one gather of every rank's shards per name, so only the rank
        that writes the snapshot holds full copies: ADM-256's raw weights and one EMA are 4.4 GB)."""
        import torch.distributed as dist

        layout = self.layout()
        sets = ({"raw": self.masters()} if include_raw else {}) | self.all_shadows()
        world = dist.get_world_size() if dist.is_initialized() else 1
        out = {}
        for name, shards in sets.items():
            if world == 1:
                out[name] = self.assemble(layout, [shards])
                continue
            flat = torch.cat([s.detach().reshape(-1) for s in shards])  # the same length on every rank
            mine = dist.get_rank() == dst
            gathered = [torch.empty_like(flat) for _ in range(world)] if mine else None
            dist.gather(flat, gathered, dst=dst)
            if mine:
                sizes = [s.numel() for s in shards]
                out[name] = self.assemble(layout, [list(g.split(sizes)) for g in gathered])
        return out

    def load_resharded(self, old_layout: dict, old: dict[str, list[list[torch.Tensor]]]) -> None:
        """Set every EMA's shards from the shards another world size saved ({"ema_<rate>": [rank 0's shards,
        rank 1's, ...], ...}): how the EMA survives a resume at another world size, ZeRO stage or precision.
        No communication, and no full copy (ADM-256's EMA is 2.2 GB in fp32, for each rate on each rank)."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        layout = self.layout()
        for key, shadow in self.all_shadows().items():
            self.reshard(old_layout, old[key], layout, rank, shadow)
