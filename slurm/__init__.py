"""slurm package (built in its own issue)."""
