"""EMA of the fp32 master weights, on each rank's own shard: no communication per step.

Under ZeRO-1/2 this rank's master partition is `engine.optimizer.single_partition_of_fp32_groups`
(flat, one tensor per parameter group); under ZeRO-3, `safe_get_local_fp32_param(p)` per parameter.
Consolidation (for snapshots) swaps the EMA into the master partitions, gathers full parameters with
DeepSpeed's own collective (`safe_get_full_fp32_param`), and swaps back.
"""

import torch


class ShardEMA:
    def __init__(self, engine, rates: list[float], zero_stage: int, power_sigma_rels: list[float] = ()):
        from .power_ema import PowerEMA

        self.engine, self.rates, self.stage = engine, list(rates), zero_stage
        self.shadows = {rate: [m.detach().clone() for m in self.masters()] for rate in self.rates}
        self.updates = 0
        self.power = PowerEMA(self.masters(), list(power_sigma_rels)) if power_sigma_rels else None

    def masters(self) -> list[torch.Tensor]:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            return [safe_get_local_fp32_param(p) for p in self.engine.module.parameters()]
        return list(self.engine.optimizer.single_partition_of_fp32_groups)

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
        return {"rates": self.rates, "updates": self.updates,
                "shadows": {str(r): [t.clone() for t in s] for r, s in self.shadows.items()},
                "power": self.power.state_dict() if self.power is not None else None}

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
    def full_state_dicts(self, include_raw: bool = True) -> dict[str, dict]:
        """{"raw": ..., "ema_<rate>": ..., "phema_<sigma_rel>": ...} full fp32 state dicts (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        names = [n for n, _ in self.engine.module.named_parameters()]
        params = [p for _, p in self.engine.module.named_parameters()]

        def gather():
            return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in zip(names, params)}

        out = {"raw": gather()} if include_raw else {}
        masters = self.masters()
        saved = [m.detach().clone() for m in masters]
        try:
            for name, shadow in self.all_shadows().items():
                for m, s in zip(masters, shadow):
                    m.copy_(s)
                out[name] = gather()
        finally:
            for m, s in zip(masters, saved):
                m.copy_(s)
        return out

    @torch.no_grad()
    def load_full(self, full: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set every rate's shard from consolidated EMA weights {"ema_<rate>": state dict} (collective):
        how EMA survives a resume at another world size, where the old shards do not fit."""
        from deepspeed.utils import safe_set_full_fp32_param

        named = list(self.engine.module.named_parameters())
        masters = self.masters()
        saved = [m.detach().clone() for m in masters]
        try:
            for key, shadow in self.all_shadows().items():
                weights = full[key]
                for name, p in named:
                    safe_set_full_fp32_param(p, weights[name].to(saved[0].device))
                for s, m in zip(shadow, self.masters()):
                    s.copy_(m)
        finally:
            for m, s in zip(self.masters(), saved):
                m.copy_(s)
