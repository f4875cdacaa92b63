#!/usr/bin/env bash
# FSDP2 on a GPU machine in one call (at most ~9 min by the limits below), each part under its own
# time limit:
#   1. stage random weights of the exact Phi-2 shape and a synthetic prepare stage
#   2. single: plain `python3 -m jobs.train --preset phi2-bf16` for FSDP_STEPS steps
#   3. fsdp:   the same through `accelerate launch --config_file accelerate_configs/fsdp.yaml`
#   4. preempt: an FSDP run whose workers get SIGTERM after its first checkpoint: they must
#      commit a checkpoint and exit 75; then resume: the same command again must resume from
#      it and finish (exit 0)
#   5. tokens/s of 2 and 3 side by side (median of the steps after FSDP_WARMUP)
# Logs go to $OUT (or /tmp/fsdp-bench). Exit 0 only when every part passed.
# torch.compile is off (train.compile=false) in every run unless FSDP_COMPILE=true: its warm-up
# would take most of the time limit, and the comparison is about sharding.
# Knobs for a check of the script itself without a GPU (tiny widths, CPU FSDP over gloo):
#   FSDP_PROCS=2 FSDP_CONFIG=accelerate_configs/cpu_fsdp.yaml MEDREASON_CPU_KEEP_DTYPE=1 \
#   FSDP_STAGE_ARGS="--layers 2 --n-train 200 --n-eval 8 --tokenizer-words 20000 --device cpu" \
#   FSDP_MICRO=1 FSDP_SET="train.pack_len_tokens=256 data.max_len_tokens=256" bash bench/fsdp_device.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
RES="${OUT:-/tmp/fsdp-bench}"
STORE="${BENCH_STORE:-/tmp/fsdp-store}"
STEPS="${FSDP_STEPS:-20}"
WARMUP="${FSDP_WARMUP:-6}"
SAVE_EVERY="${FSDP_SAVE_EVERY:-5}"
PROCS="${FSDP_PROCS:-1}"
CONFIG="${FSDP_CONFIG:-accelerate_configs/fsdp.yaml}"
read -r -a STAGE_ARGS <<<"${FSDP_STAGE_ARGS:---n-train 1500 --n-eval 32 --device cuda}"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FAILED=()

# --set overrides common to every run: N steps, few eval batches, compile as asked, 4 packed
# rows a micro-batch: FSDP runs keep the model's own attention (a dense block-causal mask) and
# full logits, which took 61.7 GiB at 4 rows on an H100 (bench/RESULTS.md, run "plain"); 8
# rows could run out of an H200's memory.
SETS=(--set "train.max_steps=$STEPS" --set "train.eval_every_steps=$STEPS" --set train.eval_max_batches=2
      --set "train.micro_batch_size=${FSDP_MICRO:-4}"
      --set "train.compile=${FSDP_COMPILE:-false}" --set train.log_every_steps=1)
for kv in ${FSDP_SET:-}; do SETS+=(--set "$kv"); done
LAUNCH=(python3 -m accelerate.commands.launch --config_file "$CONFIG" --num_processes "$PROCS")

part() { # usage: part NAME TIME_LIMIT_S COMMAND...  (log in $RES/NAME.log)
    local name="$1" limit="$2" t0=$SECONDS rc=0
    shift 2
    echo "== $name: start $(date -u +%H:%M:%S), limit $limit s"
    timeout "$limit" "$@" >"$RES/$name.log" 2>&1 || rc=$?
    echo "== $name: rc=$rc after $((SECONDS - t0)) s"
    grep -v -e "Loading weights" -e "it/s]" "$RES/$name.log" | tail -n 8
    [[ $rc -eq 0 ]] || FAILED+=("$name (rc=$rc)")
    return "$rc"
}

new_run() { # a run with its own copy of the staged prepare stage
    rm -rf "${STORE:?}/runs/$1"
    mkdir -p "$STORE/runs/$1"
    cp -r "$STORE/runs/base/prepare" "$STORE/runs/$1/prepare"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
tok=()
[[ -d .carry/phi2-random-tok ]] && tok=(--tokenizer .carry/phi2-random-tok)
part stage 140 python3 bench/stage_phi2_random.py --store "$STORE" --run base "${STAGE_ARGS[@]}" "${tok[@]}" || {
    echo "staging failed: nothing else can run"; exit 1; }

new_run single
part single 90 python3 -m jobs.train --store "$STORE" --run single --preset phi2-bf16 "${SETS[@]}"
new_run fsdp
part fsdp 110 "${LAUNCH[@]}" -m jobs.train --store "$STORE" --run fsdp --preset phi2-bf16 "${SETS[@]}"
grep -H "training paths" "$RES/single.log" "$RES/fsdp.log"  # attention and loss differ: say which

# Preemption: SIGTERM to the workers (what a scheduler that signals every task, or
# slurm/common.sh's trap, does); torchrun itself exits 1 whatever its workers return, so the
# workers' 75 is read from their log lines and torchrun's report.
new_run preempt
PRE=("${LAUNCH[@]}" -m jobs.train --store "$STORE" --run preempt --preset phi2-bf16 "${SETS[@]}"
     --set "train.save_every_steps=$SAVE_EVERY")
preempt() {
    local ckpts="$STORE/runs/preempt/train/checkpoints" launcher workers deadline=$((SECONDS + 90))
    # Step delay (a test hook): widens the window between the first checkpoint and the end.
    MEDREASON_TEST_STEP_DELAY_S=0.3 "${PRE[@]}" >"$RES/preempt.log" 2>&1 &
    launcher=$!
    until compgen -G "$ckpts/step-*/MANIFEST.json" >/dev/null; do
        if ! kill -0 "$launcher" 2>/dev/null || ((SECONDS > deadline)); then
            echo "no checkpoint before the run ended or 90 s passed"; kill "$launcher" 2>/dev/null; wait "$launcher"
            return 1
        fi
        sleep 0.2
    done
    workers=$(pgrep -P "$launcher")
    echo "first checkpoint committed: $(ls "$ckpts"); SIGTERM to workers $(echo "$workers" | tr '\n' ' ')"
    # shellcheck disable=SC2086  # one pid per word
    kill -TERM $workers
    local stop_by=$((SECONDS + 60))
    while kill -0 "$launcher" 2>/dev/null && ((SECONDS < stop_by)); do sleep 0.5; done
    if kill -0 "$launcher" 2>/dev/null; then
        echo "still running 60 s after SIGTERM"
        # shellcheck disable=SC2086
        kill -KILL $workers "$launcher" 2>/dev/null
        wait "$launcher"
        return 1
    fi
    wait "$launcher"
    echo "launcher rc=$? (torchrun: 1 when a worker exits non-zero)"
    local exits
    exits=$(grep -c "exiting 75 so the scheduler requeues the job" "$RES/preempt.log")
    grep -v -e "Loading weights" -e "it/s]" "$RES/preempt.log" | grep -e "preempted at" -e "exitcode" | head -n 4
    [[ -f "$STORE/runs/preempt/train/MANIFEST.json" ]] && { echo "the run finished before the signal"; return 1; }
    [[ "$exits" -eq "$PROCS" ]] || { echo "$exits of $PROCS workers exited 75"; return 1; }
    ls "$ckpts"
}
echo "== preempt: start $(date -u +%H:%M:%S)"
if preempt; then
    echo "== preempt: ok"
    part resume 90 "${PRE[@]}" || true
    grep -h "resuming from" "$RES/resume.log" | head -n 1
    if ! grep -q "resuming from" "$RES/resume.log" || [[ ! -f "$STORE/runs/preempt/train/MANIFEST.json" ]]; then
        FAILED+=("resume (did not resume or commit)")
    fi
else
    echo "== preempt: FAILED"
    FAILED+=("preempt")
fi

echo "== tokens/s, median of steps after $WARMUP (single GPU vs FSDP, $PROCS process(es))"
python3 bench/fsdp_compare.py --store "$STORE" --warmup "$WARMUP" single=single fsdp=fsdp | tee "$RES/tokens_per_s.txt" \
    || FAILED+=("tokens/s")
if ((${#FAILED[@]})); then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all parts passed"
