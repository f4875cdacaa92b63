#!/usr/bin/env bash
# medreason merge as a SLURM batch job: folds the trained adapter into the base model and
# checks parity. Submit from the repository root; arguments go to `medreason merge`:
#   sbatch --dependency=afterok:<train job> slurm/merge.sh --preset phi2-seed --run my-run
# Every #SBATCH value below is a default: a flag on the sbatch command line wins, e.g.
#   sbatch --gpus-per-node=0 slurm/merge.sh ...      (merge on CPU)
#SBATCH --job-name=medreason-merge
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail

MEDREASON_HOME="${MEDREASON_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source "$MEDREASON_HOME/slurm/common.sh"

medreason_init merge
medreason_program medreason merge
rc=0
medreason_run "${MEDREASON_PREFIX[@]}" "${MEDREASON_PROGRAM[@]}" "$@" || rc=$?
medreason_finish "$rc" || exit $?
