"""The names of what a run directory holds (runs/<name>/), in one place; every reader and writer uses these.

config.yaml          the resolved config (pretraining: RootConfig; fine-tuning: FinetuneConfig)
git_revision.txt     the commit the run was started from ("-dirty" with local changes)
metrics.jsonl        one record per log step (train.log_every)
tensorboard/         the same scalars for TensorBoard
checkpoints/         step_NNNNNNNNN/ directories, each complete once it holds COMPLETE
export.safetensors   pretraining's result: the trained network (pipeline.distill: export)
summary.json         pretraining's status, steps, wall time and throughput
finetuned.safetensors, finetune.json   fine-tuning's weights (with the head) and accuracy
eval.json            pipeline.evaluate's k-NN / linear probe results
submit_command.txt   every slurm.submit command that ran in this directory
slurm/               submitit's scripts, pickles and per-rank logs
"""

from __future__ import annotations

CONFIG = "config.yaml"
GIT_REVISION = "git_revision.txt"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
EXPORT = "export.safetensors"
SUMMARY = "summary.json"
FINETUNED = "finetuned.safetensors"
FINETUNE_RESULT = "finetune.json"
EVAL = "eval.json"
SUBMIT_COMMAND = "submit_command.txt"
SLURM = "slurm"
