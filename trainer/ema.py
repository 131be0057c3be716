"""EMA of the fp32 master weights, on each rank's own shard: no communication per step.

Under ZeRO-1/2 this rank's master partition is `engine.optimizer.single_partition_of_fp32_groups`
(flat, one tensor per parameter group); under ZeRO-3, `safe_get_local_fp32_param(p)` per parameter.
Consolidation (for snapshots) all-gathers the flat shards and cuts them into parameters with a layout
read from the optimizer (`layout`); checkpoints store only each rank's shards plus that layout, so a
resume at another world size assembles the full EMA from the old rank files without any collective at
save time. Loading full weights back cuts this rank's shards out of them with the same layout.
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
    def assemble(layout: dict, per_rank: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Full fp32 state dict from the shards of every rank, in rank order."""
        out = {}
        if layout["stage"] == 3:
            for name, shape, (i,) in layout["params"]:
                out[name] = torch.cat([s[i] for s in per_rank])[:math.prod(shape)].view(shape).to("cpu", copy=True)
            return out
        flats = [torch.cat([s[g] for s in per_rank]) for g in range(len(per_rank[0]))]
        for name, shape, (g, offset) in layout["params"]:
            out[name] = flats[g][offset:offset + math.prod(shape)].view(shape).to("cpu", copy=True)
        return out

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

    @staticmethod
    def split(layout: dict, full: dict[str, torch.Tensor], rank: int, world: int,
              sizes: list[int]) -> list[torch.Tensor]:
        """This rank's shards (of the given sizes) of a full state dict: the inverse of assemble."""
        if layout["stage"] == 3:
            out = []
            for (name, _, _), size in zip(layout["params"], sizes):
                padded = torch.zeros(size * world)
                flat = full[name].reshape(-1)
                padded[:flat.numel()] = flat
                out.append(padded[rank * size:(rank + 1) * size])
            return out
        flats = [torch.zeros(size * world) for size in sizes]
        for name, shape, (g, offset) in layout["params"]:
            flats[g][offset:offset + math.prod(shape)] = full[name].reshape(-1)
        return [f[rank * size:(rank + 1) * size] for f, size in zip(flats, sizes)]

    @torch.no_grad()
    def load_full(self, full: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set every EMA's shards from consolidated weights {"ema_<rate>": state dict, ...}: how the EMA
        survives a resume at another world size, where the old shards do not fit. No communication."""
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        layout = self.layout()
        for key, shadow in self.all_shadows().items():
            shards = self.split(layout, full[key], rank, world, [s.numel() for s in shadow])
            for dst, src in zip(shadow, shards):
                dst.copy_(src.view_as(dst))
