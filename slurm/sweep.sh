#!/usr/bin/env bash
# Submit a sweep: ONE SLURM job array, task i running prepare -> train -> evaluate (or up to
# MEDREASON_SWEEP_UNTIL: train, evaluate, merge) with the overrides on line i of SWEEP_FILE,
# under its own run id <base>-<i>.
#
#   slurm/sweep.sh SWEEP_FILE [pipeline options]
#   slurm/sweep.sh sweeps/lr.txt --preset phi2-bf16 --run lr --store s3://bucket/medreason
#
# SWEEP_FILE: one task per non-comment, non-blank line; each line is whitespace-separated
# KEY=VALUE config overrides (what --set takes), e.g.
#   train.learning_rate=1e-4 lora.r=16
# Lines after `#` at the start of a line are comments. The base run id is --run, else
# $MEDREASON_RUN, else the date-time. The file is copied (next to the logs) at submission,
# so editing it later does not change a running sweep.
# At most MEDREASON_SWEEP_MAX_PARALLEL tasks run at once (`--array=0-N%M`; default: all).
# Scheduling comes from the same site file and variables as pipeline.sh (MEDREASON_PARTITION,
# MEDREASON_ACCOUNT, MEDREASON_QOS, MEDREASON_GPUS, MEDREASON_CPUS_PER_TASK,
# MEDREASON_TIME_SWEEP, MEDREASON_LOG_DIR, MEDREASON_SBATCH_ARGS).
# Prints "sweep <array job id>", then "<i> <run id> <overrides>" per task.
set -euo pipefail

MEDREASON_HOME="${MEDREASON_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export MEDREASON_HOME
# shellcheck source=slurm/common.sh
source "$MEDREASON_HOME/slurm/common.sh"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}
if (($# < 1)); then
    usage >&2
    exit "$MEDREASON_EX_USAGE"
fi
case "$1" in -h | --help) usage; exit 0 ;; esac
sweep_file="$1"
shift
if [[ ! -f "$sweep_file" ]]; then
    medreason_log "sweep file $sweep_file does not exist"
    exit "$MEDREASON_EX_USAGE"
fi
medreason_load_site

# The base run id: taken out of the options, since every task gets its own --run.
args=()
base="${MEDREASON_RUN:-sweep-$(date +%Y%m%d-%H%M%S)}"
while (($#)); do
    case "$1" in
        --run) base="${2:?--run needs a value}"; shift 2 ;;
        --run=*) base="${1#--run=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

mapfile -t lines < <(grep -v -E '^[[:space:]]*(#|$)' "$sweep_file")
count=${#lines[@]}
if ((count == 0)); then
    medreason_log "sweep file $sweep_file has no override lines"
    exit "$MEDREASON_EX_USAGE"
fi
for i in "${!lines[@]}"; do
    read -r -a words <<<"${lines[$i]}"
    for kv in "${words[@]}"; do
        if [[ "$kv" != ?*=* ]]; then
            medreason_log "sweep file $sweep_file, line $((i + 1)) of the overrides: '$kv' is not KEY=VALUE"
            exit "$MEDREASON_EX_USAGE"
        fi
    done
done

log_dir="${MEDREASON_LOG_DIR:-$PWD}"
mkdir -p "$log_dir"
snapshot="$log_dir/sweep-$base.txt"
printf '%s\n' "${lines[@]}" >"$snapshot"

array="0-$((count - 1))"
[[ -n "${MEDREASON_SWEEP_MAX_PARALLEL:-}" ]] && array+="%${MEDREASON_SWEEP_MAX_PARALLEL}"
flags=(--parsable --array="$array" --chdir="$PWD" --output="$log_dir/%x-%A_%a.out")
[[ -n "${MEDREASON_PARTITION:-}" ]] && flags+=(--partition="$MEDREASON_PARTITION")
[[ -n "${MEDREASON_ACCOUNT:-}" ]] && flags+=(--account="$MEDREASON_ACCOUNT")
[[ -n "${MEDREASON_QOS:-}" ]] && flags+=(--qos="$MEDREASON_QOS")
[[ -n "${MEDREASON_CPUS_PER_TASK:-}" ]] && flags+=(--cpus-per-task="$MEDREASON_CPUS_PER_TASK")
[[ -n "${MEDREASON_GPUS:-}" ]] && flags+=(--gpus-per-node="$MEDREASON_GPUS")
[[ -n "${MEDREASON_TIME_SWEEP:-}" ]] && flags+=(--time="$MEDREASON_TIME_SWEEP")
if [[ -n "${MEDREASON_SBATCH_ARGS:-}" ]]; then
    read -r -a extra <<<"$MEDREASON_SBATCH_ARGS"
    flags+=("${extra[@]}")
fi

job=$(sbatch "${flags[@]}" "$MEDREASON_HOME/slurm/sweep_task.sh" "$snapshot" "$base" "${args[@]}" | cut -d';' -f1)
printf 'sweep %s\n' "$job"
for i in "${!lines[@]}"; do
    printf '%s %s %s\n' "$i" "$base-$i" "${lines[$i]}"
done
