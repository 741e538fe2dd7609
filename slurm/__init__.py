"""Slurm launch via submitit, kept apart from the trainer (which never imports submitit).

- ``submit.py``: ``python -m slurm.submit``, the sbatch-style CLI (config checked on the login node, sweeps as arrays).
- ``executor.py``: SlurmConfig -> sbatch parameters and script.
- ``job.py``: what every task runs: train, stop on USR2/TERM at a step boundary, requeue.
- ``local_cluster.sh``: a local Slurm with accounting, for tests and the demo.
"""
