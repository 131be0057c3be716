"""The evaluation farm: Inception features, mergeable statistics, FID / sFID / precision / recall / IS."""
