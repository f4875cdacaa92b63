"""`medreason train`: a committed prepare stage -> a trained LoRA/QLoRA adapter in the store."""

from __future__ import annotations

import logging

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, make_context

log = logging.getLogger("medreason.train")

HELP = f"""Train a LoRA/QLoRA adapter on the run's prepared data; checkpoints, resume, preemption.

\b
Reads runs/<run>/prepare (tokenized splits) and the staged base model under cache/models/
(both written by `medreason prepare`); never tokenizes, never downloads. Writes
runs/<run>/train/: checkpoints/step-<N>/, adapter/, metrics.jsonl, MANIFEST.json.

\b
Precision: model.dtype bfloat16 by default (float32 on a machine without CUDA, logged).
float16 with Phi models is refused at config load: Phi-2's attention overflows fp16 (NaNs).
model.quantization int8 / nf4 (bitsandbytes, NF4 with double quantization and bf16 compute)
needs a CUDA GPU; without one the job exits 2.

\b
Resume and preemption: a rerun continues from the newest committed checkpoint (on any
machine; one that no longer matches its manifest is skipped). SIGTERM or SIGUSR1 stops every
rank at the next step boundary, commits a checkpoint and exits 75. A non-finite loss or gradient
norm stops the run before its next checkpoint and exits 2. A checkpoint made with another
config is refused (exit 2) unless --force, which starts over and removes the old checkpoints;
--force on a committed train stage redoes it.
Without a conflict, --force resumes like a plain rerun, so a requeued job keeps its progress.

\b
Distributed (DDP; FSDP for bf16 LoRA), rank 0 writes to the store, the others wait:
  accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m jobs.train --run ID ...
  accelerate launch --config_file accelerate_configs/fsdp.yaml -m jobs.train --run ID ...
  accelerate launch --config_file accelerate_configs/cpu.yaml -m jobs.train --run ID ...  (CPU, gloo)
The global batch is micro_batch_size x grad_accum_steps x processes rows.
{COMMON_HELP}"""


@click.command(help=HELP)
@common_options
@exit_codes
def train(preset, config_file, overrides, store, run_id, force, verbose):
    ctx = make_context(preset, config_file, overrides, store, run_id, force)
    from medreason.errors import InputError
    from medreason.store import check_stage, manifest_hash

    # 1. The input: a committed prepare stage of this run.
    prepare_rel = ctx.store.stage_rel(ctx.run_id, "prepare")
    prepare_manifest = ctx.store.read_manifest(prepare_rel)
    if prepare_manifest is None:
        raise InputError(
            f"no committed prepare stage for run {ctx.run_id} at {ctx.store.display(prepare_rel)}: "
            f"run `medreason prepare --run {ctx.run_id}` first"
        )
    inputs = {"prepare": manifest_hash(prepare_manifest)}

    # 2. Already done with this config and these inputs? Then say so and write nothing.
    done = check_stage(ctx.store, ctx.run_id, "train", ctx.config.stage_hash("train"), inputs, ctx.force)
    if done is not None:
        log.info("train of run %s is already committed at %s (best eval loss %s); nothing to do",
                 ctx.run_id, ctx.store.display(ctx.store.stage_rel(ctx.run_id, "train")),
                 done.get("metrics", {}).get("best_eval_loss"))
        return

    # 3. Train (resuming from the newest checkpoint if there is one) and commit.
    from medreason.training import make_accelerator, train_adapter

    accelerator = make_accelerator()
    manifest = train_adapter(ctx.config, ctx.store, ctx.run_id, prepare_manifest, ctx.force, accelerator)
    if accelerator.is_main_process:
        m = manifest.get("metrics", {})
        log.info("done: %s steps, final loss %s, best eval loss %s at step %s",
                 m.get("steps"), m.get("final_loss"), m.get("best_eval_loss"), m.get("best_step"))


if __name__ == "__main__":
    train()
