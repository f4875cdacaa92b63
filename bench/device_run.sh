#!/usr/bin/env bash
# The GPU benchmarks of bench/RESULTS.md in one call on a bare GPU machine, most important first,
# each under its own time limit so that one stuck step cannot take the others with it:
#   1. stage random weights of the exact Phi-2 shape and a synthetic prepare stage
#   2. the decode step's attention alone: the Triton kernel against SDPA (decode-attn)
#   3. `medreason evaluate` on the 1,273-question MedQA file (bench/eval_medqa.yaml): the default
#      decode (eval-medqa: CUDA graphs, the Triton decode attention), with SDPA's attention instead
#      (eval-medqa-sdpa), transformers' generate() (eval-medqa-plain), likelihood scoring (loglik)
#   4. evaluate's decode paths side by side on the same prompts, and the file's bandwidth limit
#   5. the packed training attention's kernels alone (train-attn), then
#      `bench/train_throughput.py` on TRAIN_VARIANTS (default: phi2-bf16), with a profile of the
#      last steps of each
# Needs .carry/medqa_test_4opt.jsonl and .carry/phi2-random-tok/ (a tokenizer saved by
# bench/stage_phi2_random.py; without it the script trains one, ~40 s). Logs and results go to
# RESULTS_DIR (first argument, default /tmp/bench-results). BENCH_STEPS picks steps (default all:
# "stage gpu-tests decode-attn eval-medqa eval-medqa-unfused decode-profile eval-medqa-sdpa
# eval-medqa-plain loglik eval-medqa-kernels eval-bench train-attn train"); stage always runs
# first when named. EVAL_PATHS: eval-bench's --paths; DECODE_SDPA: eval-medqa-kernels' kernels.
#   bash bench/device_run.sh /tmp/bench-results
#   BENCH_STEPS="stage eval-medqa" bash bench/device_run.sh /tmp/bench-results
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
RES="${1:-/tmp/bench-results}"
STORE="${BENCH_STORE:-/tmp/bench-store}"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

STEPS=" ${BENCH_STEPS:-stage gpu-tests decode-attn eval-medqa eval-medqa-unfused decode-profile eval-medqa-sdpa eval-medqa-plain loglik eval-medqa-kernels eval-bench train-attn train} "
read -r -a VARIANTS <<<"${TRAIN_VARIANTS:-bf16=phi2-bf16}"
read -r -a EVAL_PATH_LIST <<<"${EVAL_PATHS:-none graphs}"

step() { # usage: step NAME TIME_LIMIT_S COMMAND...
    local name="$1" limit="$2" t0=$SECONDS rc=0
    shift 2
    [[ "$STEPS" == *" $name "* || "$name" == profile ]] || return 0
    echo "== $name: start $(date -u +%H:%M:%S), limit $limit s"
    timeout "$limit" "$@" >"$RES/$name.log" 2>&1 || rc=$?
    echo "== $name: rc=$rc after $((SECONDS - t0)) s"
    grep -v -e "Loading weights" -e "it/s]" "$RES/$name.log" | tail -n "${TAIL_LINES:-12}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
tok=()
[[ -d .carry/phi2-random-tok ]] && tok=(--tokenizer .carry/phi2-random-tok)
step stage 150 python3 bench/stage_phi2_random.py --store "$STORE" --run bench --n-train 4000 --n-eval 64 \
    "${tok[@]}" --device cuda
evaluate() { # usage: evaluate NAME LIMIT [--set k=v ...]: the job on the MedQA file, manifest kept
    local name="$1" limit="$2"
    shift 2
    step "$name" "$limit" python3 -m jobs.cli evaluate --store "$STORE" --run bench --config bench/eval_medqa.yaml \
        --name "$name" --force "$@"
    cp "$STORE/runs/bench/evaluate/$name/MANIFEST.json" "$RES/$name-manifest.json" 2>/dev/null
}
# The kernel tests that also run on a GPU (bf16 bit-identity of the fused rotary, the residual
# dropout kernels' masks), if pytest is there.
step gpu-tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
    tests/test_residual_dropout.py -k "rotary_cache or cuda_kernel"
TAIL_LINES=40 step decode-attn 150 python3 bench/decode_attention.py --out "$RES"
# The evaluate runs take the kernel launch parameters measured fastest, unless set.
if [[ -z "${MEDREASON_DECODE_KERNEL:-}" && -f "$RES/decode_attention.json" ]]; then
    MEDREASON_DECODE_KERNEL=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["fastest_kernel"] or "")' \
        "$RES/decode_attention.json")
    export MEDREASON_DECODE_KERNEL
    echo "== MEDREASON_DECODE_KERNEL=$MEDREASON_DECODE_KERNEL"
fi
evaluate eval-medqa 180
# The decode as it was before the fused rotary + cache write and the prefill in row groups.
(export MEDREASON_DECODE_FUSED=0 MEDREASON_PREFILL_CHUNKS=0; evaluate eval-medqa-unfused 180)
# Per-step cost of each planned batch and a kernel profile of one batch's decode steps.
TAIL_LINES=60 step decode-profile 240 python3 bench/decode_profile.py --store "$STORE" \
    --bench .carry/medqa_test_4opt.jsonl --out "$RES"
evaluate eval-medqa-sdpa 180 --set eval.decode_attention=sdpa
evaluate eval-medqa-plain 200 --set eval.compile=none
evaluate loglik 100 --set eval.scoring=loglikelihood
# The SDPA decode with the attention kernels named in DECODE_SDPA (MEDREASON_DECODE_SDPA).
[[ -n "${DECODE_SDPA:-}" ]] && (export MEDREASON_DECODE_SDPA="$DECODE_SDPA"
                                evaluate eval-medqa-kernels 180)
step eval-bench 180 python3 bench/eval_throughput.py --store "$STORE" --bench .carry/medqa_test_4opt.jsonl \
    --prompts 384 --naive-prompts 0 --max-new-tokens 128 --batch-size 192 --max-batch-tokens 196608 \
    --paths "${EVAL_PATH_LIST[@]}" --out "$RES"
# The packed training attention alone: FlashAttention-2 against cuDNN's ragged kernel.
TAIL_LINES=20 step train-attn 120 python3 bench/train_attention.py --out "$RES"
vargs=()
for v in "${VARIANTS[@]}"; do vargs+=(--variant "$v"); done
step train "${TRAIN_LIMIT:-420}" python3 bench/train_throughput.py --store "$STORE" --run bench --steps "${TRAIN_STEPS:-18}" \
    --warmup 8 --profile "${TRAIN_PROFILE:-3}" --out "$RES" "${vargs[@]}"
for f in "$RES"/profile-*/profile.txt; do
    [[ -f "$f" ]] && TAIL_LINES=40 step profile 5 cat "$f"
done
