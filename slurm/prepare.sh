#!/usr/bin/env bash
# medreason prepare as a SLURM batch job (CPU only: downloads/reads and tokenizes the data).
# Submit from the repository root; arguments go to `medreason prepare`:
#   sbatch slurm/prepare.sh --preset phi2-seed --run my-run
# Every #SBATCH value below is a default: a flag on the sbatch command line wins, e.g.
#   sbatch --partition=cpu --time=00:20:00 slurm/prepare.sh ...
#SBATCH --job-name=medreason-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
set -euo pipefail

MEDREASON_HOME="${MEDREASON_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source "$MEDREASON_HOME/slurm/common.sh"

medreason_init prepare
medreason_program medreason prepare
rc=0
medreason_run "${MEDREASON_PREFIX[@]}" "${MEDREASON_PROGRAM[@]}" "$@" || rc=$?
medreason_finish "$rc" || exit $?
