"""Slurm through submitit: submit training (and evaluation) jobs, requeue on preemption, watch them."""
