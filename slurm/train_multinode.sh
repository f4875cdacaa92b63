#!/usr/bin/env bash
# medreason train across several nodes: one srun task per node, each running
# `accelerate launch` with one process per GPU of its node (accelerate_configs/multi_node.yaml,
# or MEDREASON_ACCELERATE_CONFIG, e.g. accelerate_configs/fsdp.yaml). The first node of the
# allocation (`scontrol show hostnames`) hosts a c10d rendezvous on port MEDREASON_MAIN_PORT
# (default 29500). A worker crash restarts the workers of every node through that rendezvous
# at most MEDREASON_MAX_RESTARTS times (torchrun --max_restarts, default 3; each restart
# resumes from the newest committed checkpoint); a launcher that gives up ends its srun task,
# and --kill-on-bad-exit=1 ends the others instead of leaving them in the rendezvous.
# Submit from the repository root; arguments go to the job:
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train_multinode.sh --preset phi2-bf16 --run my-run
# Every #SBATCH value below is a default: a flag on the sbatch command line wins.
# Preemption works as in train.sh: SIGUSR1/SIGTERM to this shell is sent on as SIGTERM to
# srun, which relays it to every node's launcher, which relays it to its workers; a job that
# stopped that way is requeued (at most MEDREASON_MAX_REQUEUES times) and resumes.
#SBATCH --job-name=medreason-train-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --gpus-per-node=8
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
nodes="${SLURM_NNODES:-1}"
gpus="$(medreason_gpus)"
procs_per_node=$((gpus > 0 ? gpus : 1))
main_ip="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
config="${MEDREASON_ACCELERATE_CONFIG:-$MEDREASON_ACCELERATE_CONFIG_DIR/multi_node.yaml}"
medreason_program accelerate launch
launch_args=(
    --config_file "$config"
    --num_machines "$nodes"
    --num_processes "$((nodes * procs_per_node))"
    --main_process_ip "$main_ip"
    --main_process_port "${MEDREASON_MAIN_PORT:-29500}"
    --rdzv_backend c10d
    --max_restarts "${MEDREASON_MAX_RESTARTS:-3}"
    -m jobs.train "$@"
)
MEDREASON_FORWARD_AS=TERM
medreason_log "nodes=$nodes processes/node=$procs_per_node rendezvous=c10d@$main_ip max_restarts=${MEDREASON_MAX_RESTARTS:-3} config=$config"

# The machine rank differs per node, so it must be expanded by each task, not here: the
# single-quoted script sees $SLURM_PROCID (0..nodes-1) of its own task. Its arguments are
# the launcher (first $1 words), then the launcher's options and the job's.
rc=0
# shellcheck disable=SC2016
medreason_run srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${MEDREASON_SRUN_FLAGS[@]}" \
    "${MEDREASON_EXEC[@]}" bash -c \
    'n="$1"; shift; exec "${@:1:n}" --machine_rank "$SLURM_PROCID" "${@:n+1}"' \
    medreason-node "${#MEDREASON_PROGRAM[@]}" "${MEDREASON_PROGRAM[@]}" "${launch_args[@]}" ||
    rc=$?
medreason_finish "$rc" || exit $?
