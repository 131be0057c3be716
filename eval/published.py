"""The paper's numbers (Dhariwal & Nichol 2021, Tables 5 and 6; 50k samples, ADM's evaluator), as
reference lines in reports for runs whose model matches a published preset."""

# preset -> {label: metrics}
PUBLISHED = {
    "adm-64": {"ADM": dict(fid=2.61, sfid=3.77, precision=0.73, recall=0.63),
               "ADM (dropout)": dict(fid=2.07, sfid=4.29, precision=0.74, recall=0.63)},
    "adm-128": {"ADM": dict(fid=5.91, sfid=5.09, precision=0.70, recall=0.65),
                "ADM-G": dict(fid=2.97, sfid=5.09, precision=0.78, recall=0.59),
                "ADM-G (25 steps)": dict(fid=5.98, sfid=7.04, precision=0.78, recall=0.51)},
    "adm-256": {"ADM": dict(fid=10.94, sfid=6.02, precision=0.69, recall=0.63, inception_score=100.98),
                "ADM-G": dict(fid=4.59, sfid=5.25, precision=0.82, recall=0.52, inception_score=186.70),
                "ADM-G (25 steps)": dict(fid=5.44, sfid=5.32, precision=0.81, recall=0.49)},
    "adm-512": {"ADM": dict(fid=23.24, sfid=10.19, precision=0.73, recall=0.60, inception_score=58.06),
                "ADM-G": dict(fid=7.72, sfid=6.57, precision=0.87, recall=0.42, inception_score=172.71),
                "ADM-G (25 steps)": dict(fid=8.41, sfid=9.67, precision=0.83, recall=0.47)},
    "adm-256-uncond": {"ADM (2M steps at batch 256)": dict(fid=26.21, sfid=6.35, precision=0.61, recall=0.63,
                                                           inception_score=39.70),
                       "ADM-G, scale 1 (2M steps)": dict(fid=33.03, sfid=6.99, precision=0.56, recall=0.65,
                                                         inception_score=32.92),
                       "ADM-G, scale 10 (2M steps)": dict(fid=12.00, sfid=10.40, precision=0.76, recall=0.44,
                                                          inception_score=95.41)},
    "adm-lsun": {"ADM (dropout), bedroom": dict(fid=1.90, sfid=5.59, precision=0.66, recall=0.51),
                 "ADM (dropout), horse": dict(fid=2.57, sfid=6.81, precision=0.71, recall=0.55),
                 "ADM (dropout), cat": dict(fid=5.57, sfid=6.69, precision=0.63, recall=0.52)},
}

IGNORED = {"dropout", "use_fp16"}  # training-time choices that do not make a different architecture


def published_for(model: dict) -> tuple[str | None, dict]:
    """(preset, {label: metrics}) for a snapshot's model section, or (None, {}): a preset that matches it
    exactly first (ImageNet-256 unconditional and LSUN differ only by dropout), then one whose architecture
    it has, whatever its training-time choices."""
    from models.presets import get_preset

    for exact in (True, False):
        for name, rows in PUBLISHED.items():
            preset = get_preset(name)
            want = {**preset.model, "dropout": preset.config().dropout} if exact else preset.model
            if all(model.get(k) == v for k, v in want.items() if exact or k not in IGNORED):
                return name, rows
    return None, {}
