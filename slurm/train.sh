#!/usr/bin/env bash
# medreason train on one node as a SLURM batch job: trains the LoRA adapter.
# On preemption or 300 s before the time limit SLURM sends SIGUSR1 to this shell
# (--signal=B:USR1@300), which forwards it to the job; the job commits a checkpoint and exits
# 75, and this script requeues itself (at most MEDREASON_MAX_REQUEUES times, default 5): the
# next run resumes from that checkpoint. SIGTERM (scancel, preemption) is forwarded likewise.
# One GPU (or none) runs `medreason train` directly; more GPUs run
# `accelerate launch -m jobs.train` with one process per GPU (accelerate_configs/multi_gpu.yaml,
# or MEDREASON_ACCELERATE_CONFIG, e.g. accelerate_configs/fsdp.yaml).
# Submit from the repository root; arguments go to the job:
#   sbatch slurm/train.sh --preset phi2-seed --run my-run
# Every #SBATCH value below is a default: a flag on the sbatch command line wins, e.g.
#   sbatch --gpus-per-node=4 --time=04:00:00 slurm/train.sh ...
#   sbatch --gpus-per-node=0 slurm/train.sh --preset demo ...     (CPU run)
#SBATCH --job-name=medreason-train
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

MEDREASON_HOME="${MEDREASON_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source "$MEDREASON_HOME/slurm/common.sh"

medreason_init train
medreason_launch_stage train "$@"
