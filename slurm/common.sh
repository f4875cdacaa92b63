# shellcheck shell=bash
# Shared helpers for the medreason sbatch scripts. Sourced, never run.
#
# Site settings come from the environment or from one file,
# ${MEDREASON_SLURM_ENV:-$MEDREASON_HOME/slurm/site.env} (see site.env.example), sourced
# both at submission (pipeline.sh) and at run time on the compute node.
#
# The job itself runs in the background while this shell waits, because bash runs a trap
# only between commands: a foreground job would keep a preemption signal queued until it
# finished. The trap forwards the signal; exit 75 (checkpoint committed) requeues the job.

MEDREASON_EX_USAGE=2      # bad usage/config/data: never retry
MEDREASON_EX_PREEMPTED=75 # stopped by a signal after committing a checkpoint: requeue

medreason_log() {
    printf '%s medreason[%s]: %s\n' "$(date '+%Y-%m-%dT%H:%M:%S')" "${SLURM_JOB_ID:-local}" "$*" >&2
}

# Load the site file once (it may already have been loaded at submission time; loading it
# again on the compute node is harmless and picks up node-local paths).
medreason_load_site() {
    local site="${MEDREASON_SLURM_ENV:-$MEDREASON_HOME/slurm/site.env}"
    if [[ -f "$site" ]]; then
        # shellcheck source=slurm/site.env.example
        source "$site"
    elif [[ -n "${MEDREASON_SLURM_ENV:-}" ]]; then
        medreason_log "MEDREASON_SLURM_ENV=$MEDREASON_SLURM_ENV does not exist"
        return "$MEDREASON_EX_USAGE"
    fi
}

# Number of GPUs this node got: inside a job, what SLURM granted (0 when none); outside one,
# the site's MEDREASON_GPUS.
medreason_gpus() {
    local gpus
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        gpus="${SLURM_GPUS_ON_NODE:-0}"
    else
        gpus="${MEDREASON_GPUS:-0}"
    fi
    # With some gres configurations the value is a type:count pair.
    gpus="${gpus##*:}"
    [[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0
    printf '%s\n' "$gpus"
}

# Set up the software environment for the job. Fills two arrays used by the scripts:
#   MEDREASON_SRUN_FLAGS  extra flags for srun (pyxis container flags), empty otherwise
#   MEDREASON_EXEC        a prefix that runs a command inside the image (apptainer), or empty
# and MEDREASON_PREFIX (see medreason_prefix) for single-task stages.
medreason_setup_runtime() {
    MEDREASON_SRUN_FLAGS=()
    MEDREASON_EXEC=()
    export TMPDIR="${MEDREASON_SCRATCH:-${TMPDIR:-/tmp}}"
    mkdir -p "$TMPDIR"
    [[ -n "${MEDREASON_STORE:-}" ]] && export MEDREASON_STORE
    # A job restarted after its predecessor was killed finds that run's stage lease live until
    # it expires (ttl 120 s): wait for it rather than exit 2. A requeued job takes its own over.
    export MEDREASON_WAIT_FOR_LEASE="${MEDREASON_WAIT_FOR_LEASE:-180}"
    [[ -n "${HF_HOME:-}" ]] && export HF_HOME
    [[ -n "${HF_HUB_OFFLINE:-}" ]] && export HF_HUB_OFFLINE

    local mounts="${MEDREASON_CONTAINER_MOUNTS:-}"
    case "${MEDREASON_CONTAINER_RUNTIME:-none}" in
        none | "")
            if [[ -n "${MEDREASON_VENV:-}" ]]; then
                # activate scripts reference unset variables; relax -u just for them.
                set +u
                # shellcheck source=/dev/null
                source "$MEDREASON_VENV/bin/activate"
                set -u
            fi
            MEDREASON_ACCELERATE_CONFIG_DIR="${MEDREASON_ACCELERATE_CONFIG_DIR:-$MEDREASON_HOME/accelerate_configs}"
            ;;
        pyxis | enroot)
            : "${MEDREASON_CONTAINER:?set MEDREASON_CONTAINER to the image (e.g. registry#org/medreason:tag or a .sqsh file)}"
            MEDREASON_SRUN_FLAGS=(--container-image="$MEDREASON_CONTAINER" --container-workdir=/opt/medreason)
            [[ -n "$mounts" ]] && MEDREASON_SRUN_FLAGS+=(--container-mounts="$mounts")
            MEDREASON_ACCELERATE_CONFIG_DIR="${MEDREASON_ACCELERATE_CONFIG_DIR:-/opt/medreason/accelerate_configs}"
            ;;
        apptainer | singularity)
            : "${MEDREASON_CONTAINER:?set MEDREASON_CONTAINER to the image (a .sif file or docker:// URI)}"
            MEDREASON_EXEC=("${MEDREASON_CONTAINER_RUNTIME}" exec --pwd /opt/medreason)
            [[ "$(medreason_gpus)" -gt 0 ]] && MEDREASON_EXEC+=(--nv)
            [[ -n "$mounts" ]] && MEDREASON_EXEC+=(--bind "$mounts")
            MEDREASON_EXEC+=("$MEDREASON_CONTAINER")
            MEDREASON_ACCELERATE_CONFIG_DIR="${MEDREASON_ACCELERATE_CONFIG_DIR:-/opt/medreason/accelerate_configs}"
            ;;
        *)
            medreason_log "unknown MEDREASON_CONTAINER_RUNTIME=${MEDREASON_CONTAINER_RUNTIME} (none, pyxis or apptainer)"
            return "$MEDREASON_EX_USAGE"
            ;;
    esac
    medreason_prefix
}

# The prefix that runs one command as one task in the configured runtime: pyxis needs an
# srun step, apptainer an exec, a plain venv nothing. An array, not a function: the job must
# be a direct child of this shell so the forwarded signal reaches it, not a subshell.
medreason_prefix() { # result in MEDREASON_PREFIX
    MEDREASON_PREFIX=()
    if ((${#MEDREASON_SRUN_FLAGS[@]})); then
        MEDREASON_PREFIX=(srun --ntasks=1 --nodes=1 "${MEDREASON_SRUN_FLAGS[@]}")
    fi
    MEDREASON_PREFIX+=("${MEDREASON_EXEC[@]}")
}

# The program that receives the job's options. MEDREASON_CMD replaces it: a test hook that
# lets the signal/requeue mechanics be exercised with a stand-in command. Never set it in
# production.
medreason_program() { # usage: medreason_program DEFAULT... ; result in MEDREASON_PROGRAM
    # shellcheck disable=SC2034  # read by the sourcing script
    if [[ -n "${MEDREASON_CMD:-}" ]]; then
        read -r -a MEDREASON_PROGRAM <<<"$MEDREASON_CMD"
    else
        MEDREASON_PROGRAM=("$@")
    fi
}

_medreason_forward() {
    local sig="$1" as="${MEDREASON_FORWARD_AS:-$1}"
    MEDREASON_SIGNALLED="$sig"
    if [[ -n "${MEDREASON_CHILD:-}" ]]; then
        medreason_log "got SIG$sig; forwarding SIG$as to pid $MEDREASON_CHILD"
        kill -s "$as" "$MEDREASON_CHILD" 2>/dev/null || true
    fi
}

# Run the job in the background, forward USR1/TERM/INT to it, and wait for it. Returns the
# job's exit code, with one translation: a launcher (accelerate launch, srun) does not pass
# a worker's 75 through, so a non-zero exit after a forwarded preemption signal counts as
# preempted too (a resume from the newest committed checkpoint is always safe).
medreason_run() {
    local rc=0
    MEDREASON_SIGNALLED=""
    "$@" &
    MEDREASON_CHILD=$!
    trap '_medreason_forward USR1' USR1
    trap '_medreason_forward TERM' TERM
    trap '_medreason_forward INT' INT
    while :; do
        rc=0
        wait "$MEDREASON_CHILD" || rc=$?
        # wait returns 128+n when a trapped signal interrupts it; the child may still run.
        if ((rc > 128)) && kill -0 "$MEDREASON_CHILD" 2>/dev/null; then
            continue
        fi
        break
    done
    trap - USR1 TERM INT
    MEDREASON_CHILD=""
    if [[ -n "$MEDREASON_SIGNALLED" ]] && ((rc != 0 && rc != MEDREASON_EX_USAGE && rc != MEDREASON_EX_PREEMPTED)); then
        medreason_log "job exited $rc after SIG$MEDREASON_SIGNALLED; treating it as preempted"
        rc=$MEDREASON_EX_PREEMPTED
    fi
    return "$rc"
}

# Decide what a finished job means for SLURM. 75: requeue (it resumes) while
# SLURM_RESTART_COUNT < MEDREASON_MAX_REQUEUES; 1: requeue while restarts <
# MEDREASON_MAX_RETRIES; 2 and anything else: final. Returns the code the batch script exits
# with.
medreason_finish() {
    local rc="$1" restarts="${SLURM_RESTART_COUNT:-0}"
    local max_requeues="${MEDREASON_MAX_REQUEUES:-5}" max_retries="${MEDREASON_MAX_RETRIES:-1}"
    local cap=0
    case "$rc" in
        0) medreason_log "done"; return 0 ;;
        "$MEDREASON_EX_USAGE") medreason_log "bad usage, config or data (exit 2): not retrying"; return "$rc" ;;
        "$MEDREASON_EX_PREEMPTED") cap=$max_requeues ;;
        1) cap=$max_retries ;;
        *) medreason_log "exit $rc: not retrying"; return "$rc" ;;
    esac
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        medreason_log "exit $rc outside SLURM: nothing to requeue"
        return "$rc"
    fi
    if ((restarts >= cap)); then
        medreason_log "exit $rc: already restarted $restarts time(s), cap $cap reached: not requeueing"
        return "$rc"
    fi
    # An array task is named <array job id>_<task id>: its own SLURM_JOB_ID can equal the
    # array's job id, and `scontrol requeue <array job id>` requeues every task of the array.
    local job="$SLURM_JOB_ID"
    [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]] && job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    medreason_log "exit $rc: requeueing job $job (restart $((restarts + 1)) of at most $cap)"
    # SLURM ends this run when the requeue lands; the exit code below is for the log.
    if ! scontrol requeue "$job"; then
        medreason_log "scontrol requeue failed (is the partition's JobRequeue off?)"
    fi
    return "$rc"
}

# Common start of every batch script: site settings, runtime, and a banner.
medreason_init() {
    local stage="$1"
    medreason_load_site
    medreason_setup_runtime
    medreason_log "stage=$stage node=$(hostname) restarts=${SLURM_RESTART_COUNT:-0} gpus=$(medreason_gpus) runtime=${MEDREASON_CONTAINER_RUNTIME:-none}"
}

# Run a stage's job on this node and exit as medreason_finish decides: `accelerate launch` over
# the node's GPUs when there are several, else `medreason <stage>` in this process.
medreason_launch_stage() { # usage: medreason_launch_stage STAGE [job args...]
    local stage="$1" gpus config rc=0
    shift
    local -a cmd
    gpus=$(medreason_gpus)
    if ((gpus > 1)); then
        config="${MEDREASON_ACCELERATE_CONFIG:-$MEDREASON_ACCELERATE_CONFIG_DIR/multi_gpu.yaml}"
        medreason_program accelerate launch
        # The launcher relays SIGTERM to its workers but dies on SIGUSR1: translate.
        MEDREASON_FORWARD_AS=TERM
        cmd=("${MEDREASON_PROGRAM[@]}" --config_file "$config" --num_machines 1
            --num_processes "$gpus" -m "jobs.$stage" "$@")
    else
        medreason_program medreason "$stage"
        cmd=("${MEDREASON_PROGRAM[@]}" "$@")
    fi
    medreason_run "${MEDREASON_PREFIX[@]}" "${cmd[@]}" || rc=$?
    medreason_finish "$rc" || exit $?
}
