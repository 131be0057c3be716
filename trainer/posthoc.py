"""`adm posthoc RUN_DIR --sigma-rel S`: synthesise the EMA of any width after training (EDM2).

Reads the power-function EMA profiles stored in the run's snapshots (train with power_ema=[...]) and
writes a new snapshot with the reconstructed weights, beside the others.
"""

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file


def main(argv: list[str] | None = None, prog: str = "python -m trainer.posthoc") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative EMA width to synthesise, e.g. 0.07")
    p.add_argument("--at", help="snapshot tag to reconstruct at (default: the latest)")
    a = p.parse_args(argv)
    from models.snapshot import load_snapshot, save_snapshot

    from .power_ema import reconstruct

    snaps = sorted((Path(a.run_dir) / "snapshots").glob("img*"))
    snaps = [s for s in snaps if "-" not in s.name]
    if not snaps:
        raise FileNotFoundError(f"{a.run_dir}: no snapshots")
    target = next((s for s in snaps if s.name == a.at), None) if a.at else snaps[-1]
    if target is None:
        raise ValueError(f"--at {a.at}: no such snapshot in {a.run_dir}/snapshots")
    stored = []
    for s in snaps:
        meta = json.loads((s / "config.json").read_text())
        power = meta.get("power_ema") or {}
        if meta["images"] > json.loads((target / "config.json").read_text())["images"]:
            continue
        for sigma, gamma in zip(power.get("sigma_rels", []), power.get("gammas", [])):
            stored.append((meta["ema_updates"], gamma, load_file(str(s / f"phema_{sigma}.safetensors"))))
    if len(stored) < 2:
        raise ValueError(f"{a.run_dir}: needs power-EMA profiles in its snapshots (train with power_ema=[0.05,0.1])")
    snap = load_snapshot(target)
    step = snap.meta["ema_updates"]
    weights = reconstruct(stored, step, a.sigma_rel)
    out = target.with_name(f"{target.name}-posthoc-{a.sigma_rel:.3f}")
    meta = {k: v for k, v in snap.meta.items() if k not in ("format", "version")}
    meta.update(posthoc={"sigma_rel": a.sigma_rel, "profiles": len(stored)})
    save_snapshot(out, weights, snap.config, meta=meta, overwrite=True)
    print(f"wrote {out} (EMA sigma_rel {a.sigma_rel} from {len(stored)} stored profiles)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
