#!/usr/bin/env bash
# Submit the whole medreason pipeline to SLURM as four chained jobs:
#
#   prepare ──► train ──► evaluate
#                  └────► merge
#
# Each job starts only after the one it needs ended successfully (--dependency=afterok);
# --kill-on-invalid-dep=yes cancels the rest of the chain when a stage fails for good.
# Arguments go to every stage, e.g.
#   slurm/pipeline.sh --preset phi2-seed --run my-run --store s3://bucket/medreason
# Without --run, $MEDREASON_RUN is used, else a new id (date-time) so all four share one run.
# Scheduling comes from the site file (slurm/site.env, or $MEDREASON_SLURM_ENV) or the
# environment: MEDREASON_PARTITION, MEDREASON_ACCOUNT, MEDREASON_QOS, MEDREASON_GPUS
# (0 = CPU), MEDREASON_CPUS_PER_TASK, MEDREASON_TIME_<STAGE>, MEDREASON_LOG_DIR and
# MEDREASON_SBATCH_ARGS. Prints "<stage> <job id>" per line; run it on a login node.
set -euo pipefail

MEDREASON_HOME="${MEDREASON_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export MEDREASON_HOME
# shellcheck source=slurm/common.sh
source "$MEDREASON_HOME/slurm/common.sh"
medreason_load_site

args=("$@")
has_run=0
for arg in "$@"; do
    case "$arg" in
        --run | --run=*) has_run=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
    esac
done
if ((!has_run)); then
    run="${MEDREASON_RUN:-$(date +%Y%m%d-%H%M%S)}"
    args+=(--run "$run")
fi

common=(--parsable --kill-on-invalid-dep=yes)
[[ -n "${MEDREASON_PARTITION:-}" ]] && common+=(--partition="$MEDREASON_PARTITION")
[[ -n "${MEDREASON_ACCOUNT:-}" ]] && common+=(--account="$MEDREASON_ACCOUNT")
[[ -n "${MEDREASON_QOS:-}" ]] && common+=(--qos="$MEDREASON_QOS")
[[ -n "${MEDREASON_CPUS_PER_TASK:-}" ]] && common+=(--cpus-per-task="$MEDREASON_CPUS_PER_TASK")
if [[ -n "${MEDREASON_LOG_DIR:-}" ]]; then
    mkdir -p "$MEDREASON_LOG_DIR"
    common+=(--output="$MEDREASON_LOG_DIR/%x-%j.out")
fi
if [[ -n "${MEDREASON_SBATCH_ARGS:-}" ]]; then
    read -r -a extra <<<"$MEDREASON_SBATCH_ARGS"
    common+=("${extra[@]}")
fi
gpu_flags=()
[[ -n "${MEDREASON_GPUS:-}" ]] && gpu_flags=(--gpus-per-node="$MEDREASON_GPUS")

# submit STAGE DEPENDENCY [extra sbatch flags...]: prints the job id.
submit() {
    local stage="$1" after="$2"
    shift 2
    local time_var flags=("${common[@]}" "$@")
    time_var="MEDREASON_TIME_${stage^^}"
    [[ -n "${!time_var:-}" ]] && flags+=(--time="${!time_var}")
    [[ -n "$after" ]] && flags+=(--dependency="afterok:$after")
    # The batch scripts find common.sh through MEDREASON_HOME (exported above).
    sbatch "${flags[@]}" --chdir="$PWD" "$MEDREASON_HOME/slurm/$stage.sh" "${args[@]}" | cut -d';' -f1
}

prepare_id=$(submit prepare "")
train_id=$(submit train "$prepare_id" "${gpu_flags[@]}")
evaluate_id=$(submit evaluate "$train_id" "${gpu_flags[@]}")
merge_id=$(submit merge "$train_id" "${gpu_flags[@]}")

printf 'prepare %s\ntrain %s\nevaluate %s\nmerge %s\n' "$prepare_id" "$train_id" "$evaluate_id" "$merge_id"
