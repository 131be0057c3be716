"""EDM2's power-function EMA and post-hoc reconstruction, against direct computation in float64."""

import numpy as np
import pytest
import torch

from trainer.power_ema import PowerEMA, beta, posthoc_coefficients, profile_inner, reconstruct, sigma_rel_to_gamma


def test_sigma_rel_gamma_relation():
    for s in (0.01, 0.05, 0.1, 0.2):
        g = sigma_rel_to_gamma(s)
        assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(s ** 2, rel=1e-9)
    assert sigma_rel_to_gamma(0.05) > sigma_rel_to_gamma(0.1)  # narrower profile, larger exponent
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.5)


def direct_ema(weights: np.ndarray, gamma: float) -> np.ndarray:
    """The power EMA by its definition: weights averaged with the discrete profile tau^gamma."""
    t = np.arange(1, len(weights) + 1, dtype=np.float64)
    w = t ** gamma
    return (w[:, None] * weights).sum(0) / w.sum()


def test_update_rule_equals_the_power_profile_average():
    g = np.random.default_rng(0)
    traj = g.normal(size=(400, 5)).cumsum(0)
    ema = PowerEMA([torch.tensor(traj[0])], [0.1])
    for row in traj[1:]:
        ema.update([torch.tensor(row)])
    gamma = sigma_rel_to_gamma(0.1)
    # the recursion reproduces sum_t t^gamma w_t / sum t^gamma up to the discretisation of the integral
    np.testing.assert_allclose(ema.shadows[0.1][0].numpy(), direct_ema(traj, gamma), rtol=0, atol=0.05 * traj.std())
    assert beta(1, gamma) == 0.0


def test_profile_inner_product_matches_numerical_integration():
    ta, ga, tb, gb = 700.0, 6.9, 1000.0, 16.97
    tau = np.linspace(0, min(ta, tb), 200001)
    pa = (ga + 1) * tau ** ga / ta ** (ga + 1)
    pb = (gb + 1) * tau ** gb / tb ** (gb + 1)
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(np.trapezoid(pa * pb, tau), rel=1e-6)


def test_posthoc_reconstruction_of_an_unseen_width():
    """Store two profiles (sigma_rel 0.05, 0.10) at several times; synthesise sigma_rel 0.07 at the end
    and compare with the 0.07 EMA computed directly along the same trajectory."""
    g = np.random.default_rng(1)
    steps = 2000
    traj = np.cumsum(g.normal(size=(steps, 8)), axis=0) / 10
    tracked = PowerEMA([torch.tensor(traj[0])], [0.05, 0.10])
    truth = PowerEMA([torch.tensor(traj[0])], [0.07])
    stored = []
    for i in range(1, steps):
        tracked.update([torch.tensor(traj[i])])
        truth.update([torch.tensor(traj[i])])
        if (i + 1) % 250 == 0:
            for s, gamma in zip(tracked.sigma_rels, tracked.gammas):
                stored.append((i + 1, gamma, {"w": tracked.shadows[s][0].clone()}))
    synth = reconstruct(stored, steps, 0.07)["w"].double()
    expected = truth.shadows[0.07][0]
    err = (synth - expected).abs().max().item()
    spread = (tracked.shadows[0.05][0] - tracked.shadows[0.10][0]).abs().max().item()
    assert err < 0.05 * spread  # far closer than the difference between the stored profiles
    # a stored profile is reproduced exactly
    x = posthoc_coefficients([(s, gm) for s, gm, _ in stored], steps, tracked.gammas[1])
    assert x[-1] == pytest.approx(1.0, abs=1e-6) and np.abs(x[:-1]).max() < 1e-6


def test_the_inner_product_stays_exact_for_narrow_profiles():
    """<p, p> = (g+1)^2 / ((2g+1) t) exactly; the log form as powers of t_min/t does not cancel for large
    exponents (gs log t - (g+1) log t - ... lost all digits at g = 1e15)."""
    for g in (0.5, 1e3, 1e9, 1e15):
        for t in (10.0, 1e6):
            assert profile_inner(t, g, t, g) == pytest.approx((g + 1) ** 2 / ((2 * g + 1) * t), rel=1e-9)
    with pytest.raises(ValueError, match=r"sigma_rel must lie in \[0.001, 0.28\), got 1e-20"):
        sigma_rel_to_gamma(1e-20)


def _power_run(root, rng=0):
    """A run directory whose two snapshots hold power-EMA profiles (sigma_rel 0.05 and 0.1), as training writes."""
    from models.config import build_model
    from models.presets import get_preset
    from models.snapshot import save_snapshot

    cfg = get_preset("tiny-classifier-32").config()
    gen = torch.Generator().manual_seed(rng)
    sigmas = [0.05, 0.1]
    for step in (10, 20):
        sd = build_model(cfg).state_dict()
        profiles = {f"phema_{s}": {k: torch.randn(v.shape, generator=gen) for k, v in sd.items()} for s in sigmas}
        save_snapshot(root / "snapshots" / f"img{step * 8:012d}", sd, cfg, extra_weights=profiles,
                      meta={"task": "classifier", "images": step * 8, "ema_updates": step,
                            "power_ema": {"sigma_rels": sigmas, "gammas": [sigma_rel_to_gamma(s) for s in sigmas]}})
    return root


def test_posthoc_reads_only_profiles_that_check_out(tmp_path, capsys):
    """A profile whose bytes changed at the same size (a flipped bit blends into every synthesised width
    unseen) is refused by its sha256, naming the file; one of NaNs likewise; widths that differ past three
    decimals get snapshots of their own; a width below the range is refused before any file is read."""
    from trainer.posthoc import main

    run = _power_run(tmp_path / "run")
    assert main([str(run), "--sigma-rel", "0.1000001"]) == 0 and main([str(run), "--sigma-rel", "0.1000002"]) == 0
    assert sorted(p.name for p in (run / "snapshots").glob("*posthoc*")) == [
        "img000000000160-posthoc-0.1000001", "img000000000160-posthoc-0.1000002"]
    with pytest.raises(ValueError, match=r"sigma_rel must lie in \[0.001, 0.28\)"):
        main([str(run), "--sigma-rel", "1e-20"])
    profile = run / "snapshots" / "img000000000080" / "phema_0.1.safetensors"
    data = bytearray(profile.read_bytes())
    data[-3] ^= 0x10  # a bit of the last float
    profile.write_bytes(bytes(data))
    from models.snapshot import SnapshotError

    with pytest.raises(SnapshotError, match=r"phema_0.1.safetensors"):
        main([str(run), "--sigma-rel", "0.07"])
    assert not (run / "snapshots" / "img000000000160-posthoc-0.070").exists()
