#!/usr/bin/env bash
# One task of a medreason sweep (submitted by slurm/sweep.sh as a job array; not submitted by
# hand). Task i takes the i-th override line of the sweep file snapshot and runs
#   medreason pipeline --until $MEDREASON_SWEEP_UNTIL --run <base>-<i> --set ... [options]
# (prepare -> train -> evaluate by default). Each array task is its own SLURM job: the
# preemption signal, exit 75 and `scontrol requeue <array id>_<task id>` (common.sh) act on this
# task alone, and a requeued task resumes its own run from its newest checkpoint.
# Arguments: SNAPSHOT BASE_RUN [pipeline options...]
#SBATCH --job-name=medreason-sweep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

MEDREASON_HOME="${MEDREASON_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source "$MEDREASON_HOME/slurm/common.sh"

snapshot="$1" base="$2"
shift 2
index="${SLURM_ARRAY_TASK_ID:?not an array task: submit the sweep with slurm/sweep.sh}"
# The index-th (0-based) non-comment, non-blank line: its words are KEY=VALUE overrides.
line="$(grep -v -E '^[[:space:]]*(#|$)' "$snapshot" | sed -n "$((index + 1))p")"
read -r -a overrides <<<"$line"
sets=()
for kv in "${overrides[@]}"; do
    sets+=(--set "$kv")
done
run="$base-$index"

medreason_init "sweep[$index]"
medreason_log "run=$run overrides: ${line}"
medreason_program medreason pipeline
rc=0
medreason_run "${MEDREASON_PREFIX[@]}" "${MEDREASON_PROGRAM[@]}" --until "${MEDREASON_SWEEP_UNTIL:-evaluate}" \
    "$@" --run "$run" "${sets[@]}" || rc=$?
medreason_finish "$rc" || exit $?
