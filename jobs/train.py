"""`medreason train`: a committed prepare stage -> a trained LoRA/QLoRA adapter in the store."""

from __future__ import annotations

import logging

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, lease_option, make_context
from jobs.stage import Built, Stage, dist_share, run_stage

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
One train job per run: rank 0 holds the stage's lease for the whole run (a second job exits 2
naming the holder, or waits with --wait-for-lease); a job that loses it exits 1 uncommitted.

\b
Distributed (DDP; FSDP for bf16 LoRA), rank 0 writes to the store, the others wait:
  accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m jobs.train --run ID ...
  accelerate launch --config_file accelerate_configs/fsdp.yaml -m jobs.train --run ID ...
  accelerate launch --config_file accelerate_configs/cpu.yaml -m jobs.train --run ID ...  (CPU, gloo)
The global batch is micro_batch_size x grad_accum_steps x processes rows.
{COMMON_HELP}"""


@click.command(help=HELP)
@common_options
@lease_option
@exit_codes
def train(preset, config_file, overrides, store, run_id, force, verbose):
    ctx = make_context(preset, config_file, overrides, store, run_id, force)
    from medreason.errors import InputError
    from medreason.store import manifest_hash
    from medreason.training import build_train_stage, make_accelerator

    # The input: a committed prepare stage of this run.
    prepare_rel = ctx.store.stage_rel(ctx.run_id, "prepare")
    prepare_manifest = ctx.store.read_manifest(prepare_rel)
    if prepare_manifest is None:
        raise InputError(
            f"no committed prepare stage for run {ctx.run_id} at {ctx.store.display(prepare_rel)}: "
            f"run `medreason prepare --run {ctx.run_id}` first"
        )
    stage = Stage("train", {"prepare": manifest_hash(prepare_manifest)})
    accelerator = make_accelerator()

    def build(folder: str) -> Built:
        # Rank 0 holds the stage's lease for the whole run (ctx.lease): checkpoints are
        # committed under it, resume and --force's removal happen after it was taken.
        metrics, timings, extra = build_train_stage(ctx.config, ctx.store, ctx.run_id, prepare_manifest,
                                                    ctx.force, accelerator, folder, ctx.lease)
        return Built(metrics, timings, extra)

    def describe(manifest: dict) -> str:
        return f"best eval loss {manifest.get('metrics', {}).get('best_eval_loss')}"

    # Every rank trains; rank 0 commits, keeping checkpoints/ (clear=False).
    done = run_stage(ctx, stage, build, describe=describe, writer=accelerator.is_main_process,
                     clear=False, share=dist_share(accelerator))
    if done.skipped:
        return
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        m = done.manifest.get("metrics", {})
        log.info("train stage committed at %s", ctx.store.display(done.rel))
        log.info("done: %s steps, final loss %s, best eval loss %s at step %s",
                 m.get("steps"), m.get("final_loss"), m.get("best_eval_loss"), m.get("best_step"))


if __name__ == "__main__":
    train()
