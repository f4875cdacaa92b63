"""Training throughput on one GPU: the original recipe vs the project's presets.

Needs a store prepared by bench/stage_phi2_random.py (random Phi-2-shaped weights + a synthetic
MedReason-like prepare stage). Every preset runs through the real train entrypoint
(`python3 -m jobs.cli train --preset X ...`) in a subprocess; its metrics.jsonl gives the
per-step real (non-padding) tokens/s and peak memory. The original recipe is re-created the way
its notebook did it: a plain transformers Trainer over rows padded to 400 tokens, batch 2,
Phi-2 in 8-bit (bitsandbytes), peft LoRA r=32 on the six projections, gradient checkpointing.

    python3 bench/train_throughput.py --store /tmp/store --run bench \\
        --variant bf16=phi2-bf16 --variant seed=phi2-seed --original --steps 30

A variant is NAME=PRESET[,key=value...] (extra --set overrides; a key in capitals, e.g.
MEDREASON_PREFETCH=0, is an environment variable of that run instead) and may be prefixed by
"plain:" to run with MEDREASON_FAST_PATH=0 (block mask, full logits).
Throughput counts real tokens only; MFU = tokens/s x 4N / 800e12 (N = base parameters,
4N: forward + activation backward of a frozen base; recomputation is not counted as work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

N_PARAMS = 2.78e9
PEAK_FLOPS = 800e12
ORIGINAL_TOKENS_PER_S = 1069.0  # the seed recipe measured on one H100 (DESIGN.md)


def summarize(rows: list[dict], warmup: int) -> dict:
    steps = [r for r in rows if r.get("tokens_per_s") and r["step"] > warmup]
    tps = [r["tokens_per_s"] for r in steps]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    return {
        "steps_timed": len(tps),
        "tokens_per_s": statistics.median(tps) if tps else None,
        "tokens_per_s_mean": statistics.fmean(tps) if tps else None,
        "peak_mem_gib": max((r.get("peak_mem_gib") or 0) for r in rows) if rows else None,
        "losses": losses,
    }


def run_preset(name: str, spec: str, store: str, run: str, steps: int, warmup: int, log_dir: str,
               profile_steps: int = 0) -> dict:
    plain = spec.startswith("plain:")
    spec = spec.removeprefix("plain:")
    preset, *items = spec.split(",")
    sets = [i for i in items if not i.split("=", 1)[0].isupper()]
    env_sets = dict(i.split("=", 1) for i in items if i.split("=", 1)[0].isupper())
    run_id = f"{run}-{name}"
    # Each variant trains in its own run: a copy of the synthetic prepare stage.
    subprocess.run([sys.executable, "bench/stage_phi2_random.py", "--store", store, "--run", run_id,
                    "--n-eval", "64"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    overrides = [f"train.max_steps={steps}", "train.eval_every_steps=100000", "train.save_every_steps=100000",
                 "train.log_every_steps=1", "train.eval_max_batches=1", *sets]
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--preset", preset, "--store", store, "--run", run_id,
           "--force"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, **env_sets}
    if plain:
        env["MEDREASON_FAST_PATH"] = "0"
    timed_until = steps
    if profile_steps:
        # The profiler window is the last steps of the run, left out of the timing (the
        # profiler slows what it records).
        timed_until = steps - profile_steps
        env["MEDREASON_PROFILE"] = f"{timed_until}:{profile_steps}:{os.path.join(log_dir, 'profile-' + name)}"
    log_path = os.path.join(log_dir, f"train-{name}.log")
    started = time.monotonic()
    with open(log_path, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - started
    result = {"name": name, "spec": ("plain:" if plain else "") + spec, "rc": rc, "wall_s": round(wall, 1),
              "command": "python3 -m jobs.cli train " + " ".join(cmd[4:])}
    metrics = os.path.join(store, "runs", run_id, "train", "metrics.jsonl")
    if rc == 0 and os.path.exists(metrics):
        with open(metrics) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        result.update(summarize([r for r in rows if r["step"] <= timed_until], warmup))
    else:
        with open(log_path) as fh:
            result["error_tail"] = fh.read()[-3000:]
    return result


def run_original(store: str, run: str, steps: int, warmup: int) -> dict:
    """The original notebook's recipe: HF Trainer + peft, 8-bit, batch 2, padded to 400."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from medreason.config import build_config
    from medreason.loading import quantization_config
    from medreason.store import ArtifactStore
    from medreason.tokens import load_split

    st = ArtifactStore(store)
    seed_model = build_config(preset="phi2-seed").model  # the original recipe: int8
    model_dir = st.materialize("cache/models/microsoft--phi-2@main", hashes=False) \
        if st.is_committed("cache/models/microsoft--phi-2@main") else None
    if model_dir is None:
        from medreason.staging import local_model_dir

        model_dir = local_model_dir(st, seed_model)
    prep = st.materialize(st.stage_rel(f"{run}-bf16" if st.is_committed(st.stage_rel(f"{run}-bf16", "prepare"))
                                       else run, "prepare"))
    split = load_split(os.path.join(prep, "train.tokens.safetensors"))
    max_len, pad_id = 400, 0
    n = (steps + 2) * 2

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            ids = split.ids(i)[:max_len].astype("int64")
            row = torch.full((max_len,), pad_id, dtype=torch.long)
            row[: len(ids)] = torch.from_numpy(ids)
            mask = torch.zeros(max_len, dtype=torch.long)
            mask[: len(ids)] = 1
            labels = row.clone()
            labels[mask == 0] = -100
            return {"input_ids": row, "attention_mask": mask, "labels": labels}

    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization_config(seed_model, torch.bfloat16),
                                                 dtype=torch.bfloat16, device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
                                             task_type="CAUSAL_LM"))
    times: list[float] = []
    real = [int(min(int(split.lengths[i]), max_len)) for i in range(n)]

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir="/tmp/original-recipe", per_device_train_batch_size=2, max_steps=steps,
                             learning_rate=2.5e-5, gradient_checkpointing=True, bf16=True, logging_steps=10,
                             save_strategy="no", report_to=[], optim="adamw_torch", dataloader_num_workers=0,
                             remove_unused_columns=False, seed=42)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()])
    trainer.train()
    # Trainer shuffles; every row is 400 positions, real tokens per row vary. Use the mean real
    # tokens per row of the dataset (the shuffled order covers it) times 2 rows per step.
    per_step_real = 2 * sum(real) / len(real)
    dts = [b - a for a, b in zip(times[warmup:], times[warmup + 1:], strict=False)]
    tps = per_step_real / statistics.median(dts)
    return {"name": "original", "spec": "HF Trainer, 8-bit, batch 2, padded to 400, grad ckpt", "rc": 0,
            "tokens_per_s": tps, "steps_timed": len(dts),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "command": "python3 bench/train_throughput.py --original"}


def table(results: list[dict], reference: float) -> str:
    lines = ["| variant | config | real tokens/s | MFU (4N) | peak GiB | x original | steps timed |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        tps = r.get("tokens_per_s")
        if not tps:
            lines.append(f"| {r['name']} | {r['spec']} | failed (rc {r['rc']}) | | | | |")
            continue
        mfu = tps * 4 * N_PARAMS / PEAK_FLOPS
        lines.append(f"| {r['name']} | {r['spec']} | {tps:,.0f} | {100 * mfu:.1f}% | "
                     f"{r.get('peak_mem_gib') or 0:.1f} | {tps / reference:.2f}x | {r.get('steps_timed')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--run", default="bench")
    ap.add_argument("--variant", action="append", default=[], help="NAME=[plain:]PRESET[,key=value...]")
    ap.add_argument("--original", action="store_true", help="also time the original recipe (HF Trainer)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8, help="steps left out of the timing (compilation)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="profile the last STEPS steps of each variant (medreason/profiling.py); "
                    "writes profile-<variant>/profile.txt under --out")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = []
    for v in args.variant:
        name, _, spec = v.partition("=")
        r = run_preset(name, spec, args.store, args.run, args.steps, args.warmup, args.out, args.profile)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
        if "error_tail" in r:
            print(r["error_tail"], flush=True)
    if args.original:
        r = run_original(args.store, args.run, args.steps, min(args.warmup, 5))
        results.append(r)
        print(json.dumps(r), flush=True)
    reference = next((r["tokens_per_s"] for r in results if r["name"] == "original" and r.get("tokens_per_s")),
                     ORIGINAL_TOKENS_PER_S)
    with open(os.path.join(args.out, "train_results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(table(results, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
