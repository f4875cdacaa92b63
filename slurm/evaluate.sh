#!/usr/bin/env bash
# medreason evaluate on one node as a SLURM batch job: generates answers on the held-out
# split and scores them. A preemption signal is forwarded like in train.sh; evaluation
# restarts from the beginning when requeued.
# One GPU (or none) runs `medreason evaluate` directly; more GPUs run
# `accelerate launch -m jobs.evaluate` with one process per GPU (accelerate_configs/multi_gpu.yaml,
# or MEDREASON_ACCELERATE_CONFIG, e.g. accelerate_configs/fsdp.yaml).
# Submit from the repository root; arguments go to the job:
#   sbatch slurm/evaluate.sh --preset phi2-seed --run my-run
# Every #SBATCH value below is a default: a flag on the sbatch command line wins, e.g.
#   sbatch --gpus-per-node=4 --time=04:00:00 slurm/evaluate.sh ...
#   sbatch --gpus-per-node=0 slurm/evaluate.sh --preset demo ...     (CPU run)
#SBATCH --job-name=medreason-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail

MEDREASON_HOME="${MEDREASON_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source "$MEDREASON_HOME/slurm/common.sh"

medreason_init evaluate
medreason_launch_stage evaluate "$@"
