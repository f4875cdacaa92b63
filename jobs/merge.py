"""medreason merge: fold the run's adapter into the base, check parity, export."""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, lease_option, make_context
from jobs.stage import Built, Stage, adopt_train_config, run_stage

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

model, data, lora and train come from the committed train stage's manifest (the manifest
of merge records them and the train manifest's hash under inputs); a --preset/--config/--set
value that contradicts them exits 2 naming both values.
{COMMON_HELP}""")
@common_options
@lease_option
@click.option("--push-to-hub", "push_repo", metavar="REPO", default=None,
              help="Also upload the merged model to this hub repo (overrides merge.push_to_hub).")
@exit_codes
def merge(preset, config_file, overrides, store, run_id, force, verbose, push_repo) -> None:
    from medreason.loading import load_tokenizer, require_stage, resolve_adapter
    from medreason.merging import (
        ParityError,
        check_parity,
        load_base_for_merge,
        merge_and_save,
        model_card,
        push_to_hub,
        zip_folder,
    )
    from medreason.staging import local_model_dir
    from medreason.store import manifest_hash

    ctx = make_context(preset, config_file, overrides, store, run_id, force)
    st, run = ctx.store, ctx.run_id
    started = time.monotonic()

    prep = require_stage(st, run, "prepare", "run `medreason prepare` first")
    train = require_stage(st, run, "train", "no committed adapter; run `medreason train` first")
    adopt_train_config(ctx, train, "merge")
    cfg = ctx.config
    inputs = {"prepare": manifest_hash(prep), "train": manifest_hash(train)}

    def build(scratch: str) -> Built:
        # Verified against the train manifest's sha256 before anything is loaded.
        adapter_dir, _, _ = resolve_adapter(st, run, "final")
        base_dir = local_model_dir(st, cfg.model)
        tokenizer = load_tokenizer(base_dir, cfg.model)
        prompts = _parity_prompts(st, run, cfg.merge.parity_prompts)
        eval_manifest = st.read_manifest(st.stage_rel(run, "evaluate"))
        base, _device = load_base_for_merge(base_dir, cfg.model, cfg.merge)
        log.info("merging the adapter into %s", cfg.model.name_or_path)
        model_dir = os.path.join(scratch, "model")
        parity = merge_and_save(base, adapter_dir, tokenizer, model_dir, prompts, cfg.merge.max_shard_size)
        log.info("parity: max |logit diff| %.3g, top-1 agreement %.4f over %d positions",
                 parity["max_abs_diff"], parity["top1_agreement"], parity["positions"])
        card = model_card(run, cfg, cfg.model.name_or_path, train, prep,
                          (eval_manifest or {}).get("metrics"), parity)
        with open(os.path.join(model_dir, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(card)
        try:
            check_parity(parity, cfg.merge.parity_max_abs_diff, cfg.merge.parity_min_top1)
        except ParityError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        zip_folder(adapter_dir, os.path.join(scratch, "adapter.zip"))
        return Built(metrics={"parity_max_abs_diff": parity["max_abs_diff"],
                              "parity_top1_agreement": parity["top1_agreement"],
                              "parity_positions": parity["positions"]},
                     timings_s={"merge": time.monotonic() - started})

    done = run_stage(ctx, Stage("merge", inputs), build, progress=True)
    if done.skipped:
        return
    log.info("merged model committed at %s (%.0f s)", st.display(f"{done.rel}/model"), time.monotonic() - started)
    repo = push_repo or cfg.merge.push_to_hub
    if repo:
        url = push_to_hub(st.materialize(done.rel) + "/model", repo)
        log.info("pushed the merged model to %s", url)


def _parity_prompts(st, run: str, n_prompts: int) -> list[list[int]]:
    """Token ids of the first prompts of prepare's eval split (train split when eval is absent)."""
    from medreason.tokens import load_split

    folder = st.materialize(st.stage_rel(run, "prepare"))
    split_path = os.path.join(folder, "eval.tokens.safetensors")
    if not os.path.exists(split_path):
        split_path = os.path.join(folder, "train.tokens.safetensors")
    split = load_split(split_path)
    n = min(n_prompts, len(split))
    if n == 0:
        raise click.UsageError("prepare's splits are empty: no prompts for the parity check")
    return [[int(t) for t in split.ids(i)[:PARITY_MAX_TOKENS]] for i in range(n)]


if __name__ == "__main__":
    merge()
