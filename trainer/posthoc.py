"""`adm posthoc RUN_DIR --sigma-rel S`: synthesise the EMA of any width after training (EDM2).

Reads the power-function EMA profiles stored in the run's snapshots (train with power_ema=[...]) and
writes a new snapshot with the reconstructed weights, beside the others.
"""

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None, prog: str = "python -m trainer.posthoc") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a training run directory (its snapshots/ hold the profiles)")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative EMA width to synthesise, e.g. 0.07")
    p.add_argument("--at", help="snapshot tag to reconstruct at (default: the latest)")
    a = p.parse_args(argv)
    from .power_ema import sigma_rel_to_gamma

    sigma_rel_to_gamma(a.sigma_rel)  # its range, before any file is read
    from models.snapshot import (SnapshotError, load_snapshot, read_config, read_manifest, save_snapshot,
                                 verify_snapshot)

    from .power_ema import reconstruct

    if not Path(a.run_dir).is_dir():
        raise FileNotFoundError(f"{a.run_dir}: no such run directory")
    snaps, incomplete = [], {}
    for s in sorted((Path(a.run_dir) / "snapshots").glob("img*")):
        if "-" in s.name:
            continue
        try:
            read_manifest(s)
        except SnapshotError as e:  # still being written (no manifest yet): not a snapshot
            incomplete[s.name] = str(e)
            continue
        verify_snapshot(s)  # listed files damaged since: refused, naming the file
        snaps.append(s)
    if a.at in incomplete:
        raise ValueError(f"--at {a.at}: {incomplete[a.at]}")
    if a.at and "-" in a.at and (Path(a.run_dir) / "snapshots" / a.at).is_dir():
        raise ValueError(f"--at {a.at}: not a training snapshot (a post-hoc one holds no profiles); give the one "
                         f"it was made from, {a.at.split('-')[0]}")
    if not snaps:
        raise FileNotFoundError(f"{a.run_dir}: no complete snapshots in {a.run_dir}/snapshots")
    target = next((s for s in snaps if s.name == a.at), None) if a.at else snaps[-1]
    if target is None:
        raise ValueError(f"--at {a.at}: no such snapshot in {a.run_dir}/snapshots")
    stored = []
    target_images = read_config(target).get("images", 0)
    for s in snaps:
        meta = read_config(s)
        power = meta.get("power_ema") or {}
        if meta.get("images", 0) > target_images:
            continue
        if power.get("sigma_rels") and meta.get("ema_updates", 0) < 1:  # profiles of no update: nothing averaged
            print(f"{s.name}: its power-EMA profiles hold no update yet (ema_updates 0); not used", file=sys.stderr)
            continue
        for sigma, gamma in zip(power.get("sigma_rels", []), power.get("gammas", [])):  # sha256 and values checked:
            profile = load_snapshot(s, hashes=True, weights=f"phema_{sigma}")  # a flipped bit would blend in
            stored.append((meta["ema_updates"], gamma, profile.state_dict))
    if len(stored) < 2:
        raise ValueError(f"{a.run_dir}: needs power-EMA profiles in its snapshots (train with power_ema=[0.05,0.1])")
    snap = load_snapshot(target)
    step = snap.meta["ema_updates"]
    weights = reconstruct(stored, step, a.sigma_rel)
    width = f"{a.sigma_rel:.3f}" if round(a.sigma_rel, 3) == a.sigma_rel else repr(a.sigma_rel)  # names stay distinct
    out = target.with_name(f"{target.name}-posthoc-{width}")
    meta = {k: v for k, v in snap.meta.items() if k not in ("format", "version")}
    meta.update(posthoc={"sigma_rel": a.sigma_rel, "profiles": len(stored)}, weights=f"posthoc-{width}")
    save_snapshot(out, weights, snap.config, meta=meta, overwrite=True)
    print(f"wrote {out} (EMA sigma_rel {a.sigma_rel} from {len(stored)} stored profiles)")
    return 0


if __name__ == "__main__":
    from adm.cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:], "python -m trainer.posthoc"))
