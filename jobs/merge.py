"""medreason merge: fold the run's adapter into the base, check parity, export."""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, make_context

log = logging.getLogger("medreason.merge")

# Parity prompts are cut to this many tokens: 4 prompts x 256 positions already compare
# ~1000 next-token distributions, and a forward pass stays cheap on a CPU.
PARITY_MAX_TOKENS = 256


@click.command(help=f"""Merge the run's final adapter into its base model.

\b
Writes runs/<run>/merge/: model/ (sharded safetensors, tokenizer, config, generation
config, README.md model card) and adapter.zip. Before committing, the merged model's
logits are compared with base + adapter on held-out prompts (merge.parity_*): a mismatch
fails the job (exit 1). --push-to-hub REPO uploads model/ (HF_TOKEN from the environment).
{COMMON_HELP}""")
@common_options
@click.option("--push-to-hub", "push_repo", metavar="REPO", default=None,
              help="Also upload the merged model to this hub repo (overrides merge.push_to_hub).")
@exit_codes
def merge(preset, config_file, overrides, store, run_id, force, verbose, push_repo) -> None:
    from medreason.loading import load_tokenizer, require_stage, resolve_adapter
    from medreason.merging import (
        ParityError,
        load_base_for_merge,
        merge_and_save,
        model_card,
        push_to_hub,
        zip_folder,
    )
    from medreason.staging import local_model_dir
    from medreason.store import build_manifest, check_stage, manifest_hash
    from medreason.tokens import load_split

    ctx = make_context(preset, config_file, overrides, store, run_id, force)
    cfg, st, run = ctx.config, ctx.store, ctx.run_id
    started = time.monotonic()

    prep = require_stage(st, run, "prepare", "run `medreason prepare` first")
    train = require_stage(st, run, "train", "no committed adapter; run `medreason train` first")
    inputs = {"prepare": manifest_hash(prep), "train": manifest_hash(train)}
    done = check_stage(st, run, "merge", cfg.stage_hash("merge"), inputs, ctx.force)
    if done is not None:
        log.info("merge of run %r is already committed at %s; nothing to do", run,
                 st.display(st.stage_rel(run, "merge")))
        return

    # Verified against the train manifest's sha256 before anything is loaded.
    adapter_dir, _, _ = resolve_adapter(st, run, "final")
    base_dir = local_model_dir(st, cfg.model)
    tokenizer = load_tokenizer(base_dir, cfg.model)

    prep_rel = st.stage_rel(run, "prepare")
    split_path = os.path.join(st.materialize(prep_rel), "eval.tokens.safetensors")
    if not os.path.exists(split_path):
        split_path = os.path.join(st.materialize(prep_rel), "train.tokens.safetensors")
    split = load_split(split_path)
    n = min(cfg.merge.parity_prompts, len(split))
    if n == 0:
        raise click.UsageError("prepare's splits are empty: no prompts for the parity check")
    prompts = [[int(t) for t in split.ids(i)[:PARITY_MAX_TOKENS]] for i in range(n)]

    eval_manifest = st.read_manifest(st.stage_rel(run, "evaluate"))
    base, _device = load_base_for_merge(base_dir, cfg.model, cfg.merge)
    log.info("merging the adapter into %s", cfg.model.name_or_path)
    with st.staged_folder() as scratch:
        model_dir = os.path.join(scratch, "model")
        parity = merge_and_save(base, adapter_dir, tokenizer, model_dir, prompts, cfg.merge.max_shard_size)
        log.info("parity: max |logit diff| %.3g, top-1 agreement %.4f over %d positions",
                 parity["max_abs_diff"], parity["top1_agreement"], parity["positions"])
        card = model_card(run, cfg, cfg.model.name_or_path, train, prep,
                          (eval_manifest or {}).get("metrics"), parity)
        with open(os.path.join(model_dir, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(card)
        try:
            from medreason.merging import check_parity

            check_parity(parity, cfg.merge.parity_max_abs_diff, cfg.merge.parity_min_top1)
        except ParityError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        zip_folder(adapter_dir, os.path.join(scratch, "adapter.zip"))
        manifest = build_manifest(
            stage="merge", run_id=run, config=cfg, config_hash=cfg.stage_hash("merge"), inputs=inputs,
            timings_s={"merge": time.monotonic() - started},
            metrics={"parity_max_abs_diff": parity["max_abs_diff"],
                     "parity_top1_agreement": parity["top1_agreement"],
                     "parity_positions": parity["positions"]},
        )
        st.commit_dir(scratch, st.stage_rel(run, "merge"), manifest, progress=True)
    merged_at = st.display(f"{st.stage_rel(run, 'merge')}/model")
    log.info("merged model committed at %s (%.0f s)", merged_at, time.monotonic() - started)
    repo = push_repo or cfg.merge.push_to_hub
    if repo:
        url = push_to_hub(st.materialize(st.stage_rel(run, "merge")) + "/model", repo)
        log.info("pushed the merged model to %s", url)


if __name__ == "__main__":
    merge()
